"""ShardTable apply_push throughput: all in memory vs a 10x smaller hot budget over the SSD tier.

Each scenario runs in a fresh process (so RSS numbers are its own): prefill
``--rows`` admitted rows (dim 16, Adagrad), warm up, then time ``--batches``
pushes of ``--batch-size`` Zipf-distributed ids over those rows. Prints pushed
ids/s, unique rows updated/s, hot bytes/row, RSS before/after, and each
scenario's throughput as a ratio of the in-memory baseline measured in the same run.

With ``--checkpoints``: checkpoint cost instead. One table of ``--rows`` rows takes
``--ckpt-rounds`` pushes (Zipf ids, 5 % new) twice, checkpointed every
``--ckpt-every`` pushes: first by a full export (what the shard server did before),
then incrementally (pipeline.ps.checkpoint: deltas, a fuzzy base in slices).
Prints the apply stall per checkpoint round (max, p99, median), bytes written per
checkpoint, the ratios, and checks that the incremental chain restores the table.

Usage: python benchmarks/ps_table.py [--rows 1000000] [--budget 100000] [--batches 150]
       python benchmarks/ps_table.py --checkpoints [--rows 2000000] [--ckpt-budget 0]
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, rss_mb

from pipeline.ps.checkpoint import CheckpointOptions, Checkpoints
from pipeline.ps.export import RowBatch, export_table
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


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _ms(values: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(values), q)) * 1000 if values else 0.0


def checkpoint_case(args: argparse.Namespace) -> None:
    """Full export vs incremental checkpoints of one growing table, in this process."""
    spec = _spec(args.dim)
    with tempfile.TemporaryDirectory(dir=args.db_dir) as tmp:
        work = Path(tmp)
        cold = None
        if args.ckpt_budget:
            width = cold_width(spec)
            cold = SsdTier(work / "cold", width, block_cache_bytes=args.block_cache_mb << 20)
        table = ShardTable(spec, cold, hot_budget_rows=args.ckpt_budget or None)
        start = time.perf_counter()
        _prefill(table, args.rows)
        print(f"prefilled {len(table):,} rows in {time.perf_counter() - start:.1f} s", flush=True)
        zipf = ZipfIds(args.rows, args.zipf, seed=1)
        rng = np.random.default_rng(2)
        grads = rng.normal(scale=0.01, size=(args.batch_size, args.dim)).astype(np.float32)
        fresh = iter(range(args.rows, 2**62))
        state = {"round": 0, "now": 1_700_000_000}

        def push() -> float:
            """One round's push (5 % new ids, so the table grows); returns its seconds."""
            n_new = args.batch_size // 20
            ids = zipf.sample(args.batch_size - n_new)
            new = splitmix64(np.fromiter(fresh, np.uint64, n_new))
            state["round"] += 1
            state["now"] += 1
            t0 = time.perf_counter()
            table.apply_push(np.concatenate([ids, new]), grads, now=state["now"])
            return time.perf_counter() - t0

        # 1. Full export every ckpt_every rounds (the previous one deleted, as before).
        full_stalls, full_bytes, full_apply = [], [], []
        previous = None
        for r in range(args.ckpt_rounds):
            full_apply.append(push())
            if (r + 1) % args.ckpt_every == 0:
                target = work / f"full-{r}"
                t0 = time.perf_counter()
                export_table(table, target)
                full_stalls.append(time.perf_counter() - t0)
                full_bytes.append(_dir_bytes(target))
                if previous is not None:
                    shutil.rmtree(previous)
                previous = target
        print(f"full exports done ({len(full_stalls)}), {len(table):,} rows", flush=True)

        # 2. Incremental: Checkpoints.step every round, its clock counting rounds so a
        # delta is due every ckpt_every rounds; the first base is written in slices.
        options = CheckpointOptions(interval_s=args.ckpt_every, max_delta_rows=args.max_delta_rows)
        chain_dir = work / "chain"
        cp = Checkpoints(chain_dir, table, options, clock=lambda: float(state["round"]))
        table.stop_change_tracking()  # a fresh server: the first step starts a base
        inc_stalls, inc_apply = [], []
        for _ in range(args.ckpt_rounds):
            inc_apply.append(push())
            t0 = time.perf_counter()
            cp.step(f"{state['round']}-0")
            inc_stalls.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cp.sync(f"{state['round']}-0")  # what a clean shutdown does: the chain = the table
        drain = time.perf_counter() - t0
        stats = cp.stats
        final_rows = len(table)
        cp.close()
        busy = [s for s in inc_stalls if s > 0.0005]  # rounds that did checkpoint work
        intervals = max(1, args.ckpt_rounds // args.ckpt_every)
        inc_bytes = (stats.delta_bytes + stats.base_bytes) / intervals
        print(
            f"incremental: {stats.cuts} cuts, {stats.deltas} deltas "
            f"({stats.delta_rows:,} rows, {stats.delta_bytes / 1e6:.1f} MB), {stats.bases} bases "
            f"({stats.base_bytes / 1e6:.1f} MB), {len(busy)} rounds with checkpoint work, "
            f"{drain:.2f} s for the final sync",
            flush=True,
        )
        if args.verify:
            _verify_chain(spec, table, chain_dir, work, args)

    full_max, inc_max = _ms(full_stalls, 1.0), _ms(inc_stalls, 1.0)
    full_p99, inc_p99 = _ms(full_stalls, 0.99), _ms(busy, 0.99)
    full_b = float(np.mean(full_bytes)) / 1e6
    # This run writes one base for few deltas; in a long run a base follows every
    # compact_fraction * rows of delta rows, so each checkpoint carries that share of one.
    delta_rows = stats.delta_rows / intervals
    base_share = delta_rows / (options.compact_fraction * final_rows)
    steady = stats.delta_bytes / intervals + base_share * stats.base_bytes / max(1, stats.bases)
    rows = [
        ["checkpoint rounds", len(full_stalls), len(busy), ""],
        ["apply stall max (ms)", full_max, inc_max, full_max / max(inc_max, 1e-9)],
        ["apply stall p99 (ms)", full_p99, inc_p99, full_p99 / max(inc_p99, 1e-9)],
        ["apply stall median (ms)", _ms(full_stalls, 0.5), _ms(busy, 0.5), ""],
        ["MB written per checkpoint, this run", full_b, inc_bytes / 1e6, full_b * 1e6 / inc_bytes],
        ["MB per checkpoint, steady state", full_b, steady / 1e6, full_b * 1e6 / steady],
        ["MB per delta (mean)", "", stats.delta_bytes / max(1, stats.deltas) / 1e6, ""],
        ["apply ms/push (median)", _ms(full_apply, 0.5), _ms(inc_apply, 0.5), ""],
    ]
    budget = f"hot budget {args.ckpt_budget:,} + SSD tier" if args.ckpt_budget else "all in memory"
    print_table(
        f"Checkpoints of a {args.rows:,}-row shard table ({budget}), dim {args.dim} adagrad, "
        f"{args.ckpt_rounds} pushes of {args.batch_size} ids each way, a checkpoint every "
        f"{args.ckpt_every} pushes (incremental: stalls of the rounds that did checkpoint work, "
        f"bytes of deltas + bases per {args.ckpt_every} pushes)",
        ["", "full export", "incremental", "ratio full/incr"],
        rows,
    )


def _verify_chain(
    spec: TableSpec, table: ShardTable, chain_dir: Path, work: Path, args: argparse.Namespace
) -> None:
    """Restore the chain into a new table: the same rows as the live one, bit for bit."""
    cold = None
    if args.ckpt_budget:
        cold = SsdTier(work / "cold2", cold_width(spec), block_cache_bytes=64 << 20)
    restored = ShardTable(spec, cold, hot_budget_rows=args.ckpt_budget or None)
    t0 = time.perf_counter()
    cp = Checkpoints(chain_dir, restored, CheckpointOptions())
    cp.restore()
    cp.close()
    seconds = time.perf_counter() - t0
    a, b = (list(t.export_rows(1 << 20)) for t in (table, restored))
    for column in ("ids", "weights", "opt_state", "show", "click", "last_seen", "admitted"):
        left = np.concatenate([getattr(x, column) for x in a])
        right = np.concatenate([getattr(x, column) for x in b])
        order_l = np.argsort(np.concatenate([x.ids for x in a]), kind="stable")
        order_r = np.argsort(np.concatenate([x.ids for x in b]), kind="stable")
        if not np.array_equal(left[order_l], right[order_r]):
            raise SystemExit(f"restored chain differs from the live table in {column}")
    print(f"verified: the chain restores all {len(restored):,} rows bit for bit ({seconds:.1f} s)")


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
    parser.add_argument("--checkpoints", action="store_true", help="full export vs incremental")
    parser.add_argument("--ckpt-budget", type=int, default=0, help="hot budget (0: in memory)")
    parser.add_argument("--ckpt-rounds", type=int, default=400, help="pushes per method")
    parser.add_argument("--ckpt-every", type=int, default=50, help="pushes between checkpoints")
    parser.add_argument("--max-delta-rows", type=int, default=65_536)
    parser.add_argument("--no-verify", dest="verify", action="store_false")
    args = parser.parse_args()
    if args.checkpoints:
        if args.rows == parser.get_default("rows"):
            args.rows = 2_000_000
        checkpoint_case(args)
        return
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
