"""ShardTable apply_push throughput: all in memory vs a 10x smaller hot budget over the SSD tier.

Each scenario runs in a fresh process (so RSS numbers are its own): prefill
``--rows`` admitted rows (dim 16, Adagrad), warm up, then time ``--batches``
pushes of ``--batch-size`` Zipf-distributed ids over those rows. Prints pushed
ids/s, unique rows updated/s, hot bytes/row, RSS before/after, and each
scenario's throughput as a ratio of the in-memory baseline measured in the same run.

Usage: python benchmarks/ps_table.py [--rows 1000000] [--budget 100000] [--batches 150]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, rss_mb

from pipeline.ps.export import RowBatch
from pipeline.ps.initializers import splitmix64
from pipeline.ps.spec import TableSpec
from pipeline.ps.table import ShardTable, cold_width
from pipeline.ps.tiers import SsdTier


def _spec(dim: int) -> TableSpec:
    return TableSpec.from_dict(
        {
            "name": "bench",
            "dim": dim,
            "optimizer": {"kind": "adagrad", "lr": 0.05},
            "accessor": {"admit_threshold": 0.0},
        }
    )


class ZipfIds:
    """Ids whose rank r in [0, rows) is drawn with P(r) ~ 1 / (r + 1)^a; id = splitmix64(r)."""

    def __init__(self, rows: int, a: float, seed: int) -> None:
        weights = 1.0 / np.arange(1, rows + 1, dtype=np.float64) ** a
        self.cdf = np.cumsum(weights) / weights.sum()
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> np.ndarray:
        ranks = np.searchsorted(self.cdf, self.rng.random(n), side="right")
        return splitmix64(np.minimum(ranks, self.cdf.shape[0] - 1).astype(np.uint64))


def _prefill(table: ShardTable, rows: int, chunk: int = 65_536) -> float:
    """Import ``rows`` admitted rows (ids = splitmix64(rank)); returns rows/s."""
    start = time.perf_counter()
    sw = table.state_width
    rng = np.random.default_rng(0)
    for lo in range(0, rows, chunk):
        n = min(chunk, rows - lo)
        ids = splitmix64(np.arange(lo, lo + n, dtype=np.uint64))
        table.import_rows(
            RowBatch(
                ids,
                rng.normal(scale=0.01, size=(n, table.dim)).astype(np.float32),
                rng.random((n, sw), dtype=np.float32),  # incompressible, like real state
                np.ones(n, np.float32),
                np.zeros(n, np.float32),
                np.zeros(n, np.int64),
                np.ones(n, bool),
            )
        )
    return rows / (time.perf_counter() - start)


def run_scenario(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One scenario in this (fresh) process."""
    rss_before = rss_mb()
    spec = _spec(args.dim)
    with tempfile.TemporaryDirectory(dir=args.db_dir) as tmp:
        cold = None
        if name == "ssd tier":
            width = cold_width(spec)
            cold = SsdTier(Path(tmp) / "db", width, block_cache_bytes=args.block_cache_mb << 20)
        budget = args.budget if cold is not None else None
        table = ShardTable(spec, cold, hot_budget_rows=budget)
        load_rate = _prefill(table, args.rows)
        zipf = ZipfIds(args.rows, args.zipf, seed=1)
        rng = np.random.default_rng(2)
        grads = rng.normal(scale=0.01, size=(args.batch_size, args.dim)).astype(np.float32)
        now = 1_700_000_000
        for _ in range(args.warmup):
            now += 1
            table.apply_push(zipf.sample(args.batch_size), grads, now=now)
        unique = promoted = 0
        start = time.perf_counter()
        for _ in range(args.batches):
            now += 1
            result = table.apply_push(zipf.sample(args.batch_size), grads, now=now)
            unique += result.changed_ids.shape[0]
            promoted += result.promoted
        elapsed = time.perf_counter() - start
        out = {
            "scenario": name,
            "rows": len(table),
            "hot rows": table.hot_rows,
            "load rows/s": load_rate,
            "ids/s": args.batches * args.batch_size / elapsed,
            "unique rows/s": unique / elapsed,
            "promoted/batch": promoted / args.batches,
            "hot B/row": table.bytes_per_row(),
            "RSS before MB": rss_before,
            "RSS after MB": rss_mb(),
        }
        if cold is not None:
            cold.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the table")
    parser.add_argument("--budget", type=int, default=None, help="hot rows (default rows/10)")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=150, help="timed pushes per scenario")
    parser.add_argument("--warmup", type=int, default=30, help="untimed pushes first")
    parser.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of id ranks")
    parser.add_argument("--block-cache-mb", type=int, default=512)
    parser.add_argument("--db-dir", default=None, help="where the SSD tier lives (a real disk)")
    args = parser.parse_args()
    args.budget = args.budget or max(1, args.rows // 10)
    results = []
    ctx = multiprocessing.get_context("spawn")
    for name in ("in memory", "ssd tier"):
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            results.append(pool.submit(run_scenario, name, args).result())
    base = results[0]["ids/s"]
    header = [*results[0].keys(), "vs memory"]
    rows = [[*r.values(), f"{r['ids/s'] / base:.2f}x"] for r in results]
    print_table(
        f"ShardTable.apply_push, dim {args.dim} adagrad, batches of {args.batch_size} Zipf"
        f"({args.zipf}) ids, {args.rows:,} rows, SSD hot budget {args.budget:,}",
        header,
        rows,
    )


if __name__ == "__main__":
    main()
