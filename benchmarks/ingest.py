"""Ingestion throughput through a real broker: columnar SampleBatch vs one Avro record per row.

Usage: ``python benchmarks/ingest.py [--rows N] [--replay-rows N] [--events N] [--batch-rows B]``.

Starts its own embedded stack (tansu broker + redis-server, free ports, temp dir), and in
one run measures, each against a baseline measured in the same run on the same rows:

* **producer**: encode + produce + flush of N Criteo-shaped samples as SampleBatch
  messages; baseline: the same rows as ``schemas/Sample.avsc`` records, one fastavro
  ``schemaless_writer`` call and one message per row (the records are built up front,
  as a row-wise producer would already hold them);
* **replay**: ``replay_dataset`` of a Criteo TSV (the real sample, repeated to
  ``--replay-rows``; synthetic rows when ``../shared/data`` is absent), parse included;
  baseline: the same parse, then one Avro ``Sample`` message per row;
* **joiner** (when ``pipeline.joiner`` is importable): impressions + clicks consumed,
  joined and written as SampleBatch messages, in input events/s; baseline: producing the
  joiner's output rows as one Avro ``Sample`` message each (what a row-wise joiner would
  at least have to do). Includes the consumer-group join (about 1 s here).

Numbers are rows (or events) per second; the ratio is columnar / per-row.
"""

from __future__ import annotations

import argparse
import io
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastavro
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, private_stack

from pipeline.codec import avro
from pipeline.codec.samplebatch import SampleBatch, concat, encode_batch, to_sample_records
from pipeline.config import KafkaSettings
from pipeline.ingest.replay import DeliveryErrors, produce_waiting, replay_dataset
from pipeline.kafka import producer as make_producer
from pipeline.smoke import CRITEO_LIKE, random_batch
from pipeline.topics import TopicSpec, apply_topics, load_topic_specs

Row = tuple[str, float, float]  # stage, columnar rate, per-row baseline rate
CRITEO_TSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo" / "train.tsv"


def per_row(settings: KafkaSettings, topic: str, records: list[dict[str, Any]]) -> float:
    """Seconds to fastavro-encode and produce one message per record, flush included."""
    schema = avro.parsed_schema("Sample")
    prod, errors = make_producer(settings), DeliveryErrors()
    start = time.perf_counter()
    for rec in records:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, schema, rec)
        produce_waiting(prod, topic, buf.getvalue(), on_delivery=errors)
    _finish(prod, errors)
    return time.perf_counter() - start


def columnar(settings: KafkaSettings, topic: str, batches: list[SampleBatch]) -> float:
    """Seconds to encode and produce one SampleBatch message per batch, flush included."""
    prod, errors = make_producer(settings), DeliveryErrors()
    start = time.perf_counter()
    for batch in batches:
        produce_waiting(prod, topic, encode_batch(batch), on_delivery=errors)
    _finish(prod, errors)
    return time.perf_counter() - start


def _finish(prod: Any, errors: DeliveryErrors) -> None:
    if prod.flush(120) or errors:
        raise SystemExit(f"delivery failed: {errors[:3] or 'flush timed out'}")


def criteo_file(folder: Path, rows: int) -> Path:
    """A Criteo TSV of ``rows`` lines: the real sample repeated, else synthetic values."""
    if CRITEO_TSV.is_file():
        lines = [line for line in CRITEO_TSV.read_text().splitlines() if line.strip()]
    else:
        rng = np.random.default_rng(0)
        lines = [
            "\t".join(
                [str(int(rng.random() < 0.25))]
                + [str(v) for v in rng.integers(0, 500, 13)]
                + [f"{v:08x}" for v in rng.integers(0, 2**32, 26)]
            )
            for _ in range(1000)
        ]
    path = folder / "criteo.tsv"
    path.write_text("\n".join(lines[i % len(lines)] for i in range(rows)) + "\n")
    return path


def bench_replay(
    settings: KafkaSettings, prefix: str, path: Path, batch_rows: int, notes: list[str]
) -> Row:
    from pipeline.ingest.adapters import open_dataset

    data = open_dataset(path, "criteo")
    summary = replay_dataset(settings, data, f"{prefix}replay", batch_rows=batch_rows)
    start = time.perf_counter()
    parsed = list(data.batches(batch_rows))
    parse_s = time.perf_counter() - start
    records = [r for b in parsed for r in to_sample_records(b)]
    rows_s = time.perf_counter() - start
    base = summary.rows / (rows_s + per_row(settings, f"{prefix}replay.rows", records))
    notes.append(f"Criteo adapter parse alone: {summary.rows / parse_s:,.0f} rows/s")
    return ("replay Criteo TSV (parse incl.)", summary.rows_per_s, base)


def _events(n: int, base_ms: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """n impressions, 100 per 10 ms of event time; every 5th gets a click 50 ms later."""
    for i in range(n):
        t = base_ms + (i // 100) * 10
        imp = {"request_id": f"r{i}", "user_id": f"u{i % 997}", "item_id": f"i{i % 1009}"}
        yield "impression", {**imp, "event_time": t, "features": {}, "context": None}
        if i % 5 == 0:
            yield "click", {**imp, "event_time": t + 50}


def bench_joiner(settings: KafkaSettings, prefix: str, impressions: int) -> Row | str:
    try:
        from pipeline.joiner.runner import JoinRunner
        from pipeline.joiner.settings import JoinerSettings
    except ImportError as exc:
        return f"joiner skipped: pipeline.joiner is not available ({exc})"
    from confluent_kafka import Consumer, TopicPartition

    from pipeline.codec.samplebatch import decode_batch

    prod, errors = make_producer(settings), DeliveryErrors()
    events = 0
    for kind, rec in _events(impressions, int(time.time() * 1000) - 3_600_000):
        topic = f"{prefix}events.{kind}s"
        name = "Impression" if kind == "impression" else "Click"
        value = avro.encode(name, rec)
        produce_waiting(prod, topic, value, key=rec["request_id"].encode(), on_delivery=errors)
        events += 1
    _finish(prod, errors)
    joiner = JoinerSettings(window_ms=500, lateness_ms=0, idle_ms=500, linger_ms=50)
    runner = JoinRunner(joiner, settings, prefix=prefix)
    stop = threading.Event()
    thread = threading.Thread(target=lambda: runner.run(stop), daemon=True)
    cons = Consumer({**settings.client_config(), "group.id": "bench-read"})
    samples = f"{prefix}samples"
    parts = cons.list_topics(samples, timeout=10).topics[samples].partitions
    cons.assign([TopicPartition(samples, p, 0) for p in parts])
    got: list[SampleBatch] = []
    start = time.perf_counter()
    thread.start()
    deadline = time.monotonic() + 300
    while sum(b.num_rows for b in got) < impressions and time.monotonic() < deadline:
        got.extend(decode_batch(m.value() or b"") for m in cons.consume(500, 0.2) if not m.error())
    elapsed = time.perf_counter() - start
    stop.set()
    thread.join(60)
    cons.close()
    rows = sum(b.num_rows for b in got)
    if rows < impressions:
        return f"joiner: only {rows} of {impressions} samples came out within 300 s"
    records = to_sample_records(concat(got))
    base = len(records) / per_row(settings, f"{prefix}samples.dlq", records)
    return (f"joiner ({events:,} events in, events/s)", events / elapsed, base)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="producer rows")
    parser.add_argument("--replay-rows", type=int, default=100_000, help="Criteo rows replayed")
    parser.add_argument("--events", type=int, default=30_000, help="impressions for the joiner")
    parser.add_argument("--batch-rows", type=int, default=1024)
    args = parser.parse_args(argv)

    with private_stack("ingest-bench-") as (stack, tmp):
        run(stack.bootstrap, tmp, args)


def run(bootstrap: str, tmp: Path, args: argparse.Namespace) -> None:
    settings = KafkaSettings(bootstrap=bootstrap, session_timeout_ms=2000)
    prefix = "bench."
    specs = load_topic_specs()
    scratch = [TopicSpec(name, 6) for name in ("batches", "rows", "replay", "replay.rows")]
    apply_topics({"bootstrap.servers": bootstrap}, [*specs, *scratch], prefix=prefix)
    rows: list[Row] = []
    notes: list[str] = []

    data = random_batch(CRITEO_LIKE, args.rows, np.random.default_rng(0))
    batches = [
        data.slice(i, min(i + args.batch_rows, args.rows))
        for i in range(0, args.rows, args.batch_rows)
    ]
    records = to_sample_records(data)
    batch_rate = args.rows / columnar(settings, f"{prefix}batches", batches)
    rows.append(
        (
            "producer (encode+produce+flush)",
            batch_rate,
            args.rows / per_row(settings, f"{prefix}rows", records),
        )
    )
    path = criteo_file(tmp, args.replay_rows)
    rows.append(bench_replay(settings, prefix, path, args.batch_rows, notes))
    joined = bench_joiner(settings, prefix, args.events)
    if isinstance(joined, str):
        notes.append(joined)
    else:
        rows.append(joined)
    print_table(
        f"Ingestion through the embedded broker at {bootstrap} (rows/s unless noted)",
        ["stage", "SampleBatch", "per-row Avro", "ratio"],
        [(name, col, base, f"{col / base:.1f}x") for name, col, base in rows],
    )
    notes.append("producers: pipeline.kafka.producer (idempotent, lz4, linger 5 ms) for both")
    for note in notes:
        print(f"  note: {note}")


if __name__ == "__main__":
    main()
