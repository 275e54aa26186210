"""SampleBatch (columnar) vs per-row Avro: encode and decode samples/s, same run, same data.

Usage: ``python benchmarks/codec.py [--rows N] [--batch B] [--repeat R] [--check]``.
Data: Criteo-like synthetic rows (26 slots with 1 id each, 13 dense) and, when
``../shared/data/criteo/train.tsv`` exists next to the repo, the real Criteo rows.
The baseline is one fastavro ``schemaless_reader``/``writer`` call per ``Sample``
record, as a row-wise topic would need. ``--check`` exits 1 when a decode ratio is
below the target.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import fastavro
import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.codec import avro
from pipeline.codec.hashing import hash64
from pipeline.codec.samplebatch import (
    SampleBatch,
    decode_batch,
    encode_batch,
    from_rows,
    from_sample_records,
    to_sample_records,
)
from pipeline.codec.slots import SlotConfig

TARGET_DECODE_RATIO = 30.0
CRITEO_SLOTS = tuple(f"C{i}" for i in range(1, 27))
CRITEO_DENSE = 13
CRITEO_TSV = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "criteo" / "train.tsv"


@dataclass
class Result:
    """One measured operation: samples/s row-wise and columnar."""

    dataset: str
    op: str
    rows_per_s: float
    batch_per_s: float

    @property
    def ratio(self) -> float:
        return self.batch_per_s / self.rows_per_s


def synthetic(rows: int, seed: int = 0) -> SampleBatch:
    """Criteo-shaped random batch built straight from arrays."""
    rng = np.random.default_rng(seed)
    n, s = rows, len(CRITEO_SLOTS)
    cfg = SlotConfig(CRITEO_SLOTS, CRITEO_DENSE)
    ids = rng.integers(0, 2**64, size=(s, n), dtype=np.uint64, endpoint=False)
    offsets = (np.arange(s)[:, None] * n + np.arange(n + 1)[None, :]).astype(np.int32)
    dense = np.log1p(rng.exponential(50.0, size=(n, CRITEO_DENSE))).astype(np.float32)
    return SampleBatch(
        labels=(rng.random(n) < 0.25).astype(np.float32),
        weights=np.ones(n, dtype=np.float32),
        event_times=1_700_000_000_000 + np.arange(n, dtype=np.int64),
        slots=cfg.slots,
        offsets=offsets,
        ids=ids.ravel(),
        dense=dense,
        fingerprint=cfg.fingerprint,
    )


def criteo(path: Path) -> SampleBatch:
    """Real Criteo rows: C1..C26 hashed with hash64, I1..I13 as log1p(max(x, 0))."""
    labels: list[float] = []
    features: list[dict[str, list[int]]] = []
    dense: list[list[float]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        cols = line.split("\t")
        if len(cols) != 1 + CRITEO_DENSE + len(CRITEO_SLOTS):
            continue
        labels.append(float(cols[0]))
        ints = cols[1 : 1 + CRITEO_DENSE]
        dense.append([math.log1p(max(float(x), 0.0)) if x else 0.0 for x in ints])
        cats = cols[1 + CRITEO_DENSE :]
        features.append({s: [hash64(s, v)] for s, v in zip(CRITEO_SLOTS, cats, strict=True) if v})
    cfg = SlotConfig(CRITEO_SLOTS, CRITEO_DENSE)
    times = 1_700_000_000_000 + np.arange(len(labels), dtype=np.int64)
    return from_rows(cfg, labels, features, times, dense=dense)


def best_rate(samples: int, fn: Callable[[], object], repeat: int) -> float:
    """Samples/s of the fastest of ``repeat`` runs of ``fn``."""
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return samples / best


def measure(name: str, full: SampleBatch, batch_rows: int, repeat: int) -> list[Result]:
    """Encode/decode the same samples row-wise and as batches of ``batch_rows``."""
    schema = avro.parsed_schema("Sample")
    cfg = full.config
    n = full.num_rows
    batches = [full.slice(i, min(i + batch_rows, n)) for i in range(0, n, batch_rows)]
    records = to_sample_records(full)
    record_chunks = [records[i : i + batch_rows] for i in range(0, n, batch_rows)]

    def write_rows() -> list[bytes]:
        out = []
        for rec in records:
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, schema, rec)
            out.append(buf.getvalue())
        return out

    row_msgs = write_rows()
    batch_msgs = [encode_batch(b) for b in batches]

    def read_rows() -> None:
        for msg in row_msgs:
            fastavro.schemaless_reader(io.BytesIO(msg), schema, None)

    def read_batches() -> None:
        for msg in batch_msgs:
            decode_batch(msg, expected=cfg)

    def write_batches() -> None:
        for b in batches:
            encode_batch(b)

    def build_and_write() -> None:
        for chunk in record_chunks:
            encode_batch(from_sample_records(cfg, chunk), validate=False)

    row_dec = best_rate(n, read_rows, repeat)
    row_enc = best_rate(n, write_rows, repeat)
    results = [
        Result(name, "decode", row_dec, best_rate(n, read_batches, max(repeat, 5))),
        Result(name, "encode (arrays)", row_enc, best_rate(n, write_batches, max(repeat, 5))),
        Result(name, "encode (from row dicts)", row_enc, best_rate(n, build_and_write, repeat)),
    ]
    row_bytes = sum(map(len, row_msgs)) / n
    batch_bytes = sum(map(len, batch_msgs)) / n
    results.append(Result(name, "wire bytes/sample", row_bytes, batch_bytes))
    return results


def render(results: Sequence[Result], console: Console, batch_rows: int) -> None:
    """Print the comparison table."""
    table = Table(title=f"codec: per-row fastavro vs SampleBatch (B={batch_rows})")
    for col in ("dataset", "op", "row-wise", "SampleBatch", "ratio"):
        table.add_column(col, justify="left" if col in ("dataset", "op") else "right")
    for r in results:
        if r.op.startswith("wire"):  # sizes, not rates: show batch/row as a plain fraction
            cells = (f"{r.rows_per_s:,.0f} B", f"{r.batch_per_s:,.0f} B", f"{r.ratio:.2f}")
        else:
            cells = (f"{r.rows_per_s:,.0f}/s", f"{r.batch_per_s:,.0f}/s", f"{r.ratio:.1f}x")
        table.add_row(r.dataset, r.op, *cells)
    console.print(table)
    console.print("rates: samples/s on one core, best of repeats, same samples on both sides")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; with --check, fail when decode speed-up < target."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="synthetic samples")
    parser.add_argument("--batch", type=int, default=1024, help="rows per SampleBatch")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs, best kept")
    parser.add_argument("--check", action="store_true", help="exit 1 below the target ratio")
    parser.add_argument("--no-criteo", action="store_true", help="skip the real Criteo rows")
    args = parser.parse_args(argv)
    console = Console()

    datasets: list[tuple[str, SampleBatch]] = [("synthetic", synthetic(args.rows))]
    if not args.no_criteo and CRITEO_TSV.is_file():
        datasets.append(("criteo", criteo(CRITEO_TSV)))
    else:
        console.print(f"[dim]criteo rows not used ({CRITEO_TSV.resolve()} absent or skipped)[/]")

    results: list[Result] = []
    for name, batch in datasets:
        results.extend(measure(name, batch, args.batch, args.repeat))
    render(results, console, args.batch)

    decode = [r for r in results if r.op == "decode"]
    worst = min(r.ratio for r in decode)
    ok = worst >= TARGET_DECODE_RATIO
    verdict = "[green]met[/]" if ok else "[red]NOT met[/]"
    console.print(
        f"target: decode ratio >= {TARGET_DECODE_RATIO:.0f}x; worst {worst:.1f}x {verdict}"
    )
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
