"""Parameter-server throughput against raw Redis, in one run on this machine.

Prints:
1. raw redis-py MGET / MSET keys/s (one key per row) and bucketed-hash HMGET keys/s
   for the same keys and value size: the two pull-view layouts considered;
2. PSClient pull and push keys/s and their ratio to raw MGET / MSET (target pull >= 0.9);
3. the shard server's applied updates/s (stream drained by ShardServer.step);
4. hot-tier bytes per feature (target <= 200 B for dim 16 with Adagrad);
5. with --grow-rows: a table grown to 10x its hot budget (SSD tier, 64 MB block cache)
   vs all in memory, each in a fresh process: resident memory at every 10 % of growth
   and the pull/push/apply throughput loss (target <= 30 %).

Usage: python benchmarks/ps.py [--keys 200000] [--dim 16] [--grow-rows 1000000 --budget 100000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, private_redis, rss_mb

from pipeline.ps.client import PSClient, TableRoute
from pipeline.ps.keys import ShardKeys, row_bytes
from pipeline.ps.server import ServerOptions, ShardServer
from pipeline.ps.spec import TableSpec

BATCH = 4096
CACHE_MB = 64  # RocksDB block cache of the growth test's SSD tier


def _spec(name: str, dim: int) -> TableSpec:
    return TableSpec.from_dict(
        {
            "name": name,
            "dim": dim,
            "initializer": {"kind": "uniform", "scale": 0.01},
            "optimizer": {"kind": "adagrad", "lr": 0.05},
            "accessor": {"admit_threshold": 0.0},
        }
    )


def _rate(count: int, fn, repeat: int = 3) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return count / best


def raw_layouts(r: redis.Redis, keys: int, dim: int) -> dict[str, float]:
    """Raw redis-py throughput of the two candidate pull-view layouts."""
    sk = ShardKeys("raw", 0)
    ids = np.arange(keys, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    names = sk.pull_keys(ids)
    values = row_bytes(np.random.default_rng(0).random((keys, dim), dtype=np.float32))

    # One command per batch of BATCH keys, as a trainer issues them (no cross-batch pipelining).
    def mset() -> None:
        for s in range(0, keys, BATCH):
            r.mset(dict(zip(names[s : s + BATCH], values[s : s + BATCH], strict=True)))

    def mget() -> None:
        for s in range(0, keys, BATCH):
            r.mget(names[s : s + BATCH])

    buckets = max(1, keys // 64)  # ~64 fields per hash: listpack-encoded, compact
    bucket_of = (ids % np.uint64(buckets)).astype(np.int64)
    fields = [i.to_bytes(8, "big") for i in ids.tolist()]
    hkeys = [f"hb:{{raw:0}}:{b}".encode() for b in range(buckets)]

    def hset() -> None:
        pipe = r.pipeline(transaction=False)
        for i in range(keys):
            pipe.hset(hkeys[bucket_of[i]], fields[i], values[i])
        pipe.execute()

    def hmget() -> None:
        order = np.argsort(bucket_of, kind="stable")
        bounds = np.searchsorted(bucket_of[order], np.arange(buckets + 1))
        pipe = r.pipeline(transaction=False)
        for b in range(buckets):
            members = order[bounds[b] : bounds[b + 1]]
            if len(members):
                pipe.hmget(hkeys[b], [fields[m] for m in members])
        pipe.execute()

    out = {"MSET": _rate(keys, mset), "MGET": _rate(keys, mget, repeat=5)}
    used = r.info("memory")["used_memory"]
    r.flushall()
    out["HSET bucketed"] = _rate(keys, hset, repeat=1)
    out["HMGET bucketed"] = _rate(keys, hmget)
    out["mem/key MGET layout"] = used / keys
    out["mem/key bucketed"] = r.info("memory")["used_memory"] / keys
    r.flushall()
    return out


def ps_client_rates(url: str, keys: int, dim: int) -> dict[str, float]:
    """PSClient pull/push and the server's applied rate, one shard, server in-process."""
    r = redis.Redis.from_url(url)
    spec = _spec("bench", dim)
    server = ShardServer(
        redis.Redis.from_url(url), [spec], 0, 1, ServerOptions(read_count=16, block_ms=1)
    )
    server.start()
    client = PSClient(r, {spec.name: TableRoute(dim, 1)}, max_inflight=10_000)
    ids = np.arange(keys, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    grads = np.random.default_rng(1).normal(size=(keys, dim)).astype(np.float32)

    def push_all() -> None:
        for s in range(0, keys, BATCH):
            client.push(spec.name, ids[s : s + BATCH], grads[s : s + BATCH])

    push_rate = _rate(keys, push_all, repeat=1)
    start = time.perf_counter()
    applied = 0
    while applied < keys // BATCH + (keys % BATCH > 0):
        applied += server.step()
    apply_rate = keys / (time.perf_counter() - start)
    client.flush()

    def pull_all() -> None:
        for s in range(0, keys, BATCH):
            client.pull(spec.name, ids[s : s + BATCH])

    names = ShardKeys(spec.name, 0).pull_keys(ids)

    def raw_mget() -> None:  # the baseline: redis-py MGET of the same keys, pre-built
        for s in range(0, keys, BATCH):
            r.mget(names[s : s + BATCH])

    pull_rate = raw_rate = 0.0
    for _ in range(5):  # interleaved, best of each: both see the same machine state
        raw_rate = max(raw_rate, _rate(keys, raw_mget, repeat=1))
        pull_rate = max(pull_rate, _rate(keys, pull_all, repeat=1))
    bpr = server.table(spec.name).bytes_per_row()
    server.close()
    r.flushall()
    return {
        "pull": pull_rate,
        "raw MGET": raw_rate,
        "push": push_rate,
        "apply": apply_rate,
        "bytes/row": bpr,
    }


def grow(
    url: str, rows: int, budget: int | None, dim: int, data_dir: Path | None
) -> dict[str, float]:
    """Grow a table to ``rows`` with Zipf-skewed traffic; report RSS and throughputs."""
    r = redis.Redis.from_url(url)
    spec = _spec(f"grow{budget or 0}", dim)
    options = ServerOptions(
        read_count=16,
        block_ms=1,
        data_dir=data_dir,
        hot_budget_rows=budget,
        checkpoint_interval_s=1e9,
        cold_block_cache_bytes=CACHE_MB << 20,  # RSS bound: hot rows + this cache + memtables
    )
    server = ShardServer(redis.Redis.from_url(url), [spec], 0, 1, options)
    server.start()
    client = PSClient(r, {spec.name: TableRoute(dim, 1)}, max_inflight=4)
    rng = np.random.default_rng(2)
    rss_start = rss_mb()
    pushed = pulled = 0
    push_s = pull_s = apply_s = 0.0
    next_new = 0
    samples = []
    while next_new < rows:
        # half new ids (the table grows), half Zipf-hot ids from what exists
        new = np.arange(next_new, min(rows, next_new + BATCH // 2), dtype=np.uint64)
        next_new += len(new)
        hot = (rng.zipf(1.1, BATCH - len(new)) % max(1, next_new)).astype(np.uint64)
        ids = np.concatenate([new, hot]) * np.uint64(0x9E3779B97F4A7C15)
        grads = rng.normal(size=(len(ids), dim)).astype(np.float32)
        t0 = time.perf_counter()
        client.pull(spec.name, ids)
        t1 = time.perf_counter()
        client.push(spec.name, ids, grads)
        t2 = time.perf_counter()
        while server.step() == 0:
            pass
        t3 = time.perf_counter()
        pull_s, push_s, apply_s = pull_s + t1 - t0, push_s + t2 - t1, apply_s + t3 - t2
        pulled += len(ids)
        pushed += len(ids)
        if len(samples) < next_new * 10 // rows:
            samples.append(rss_mb())
    table = server.table(spec.name)
    out = {
        "rows": float(len(table)),
        "hot rows": float(table.hot_rows),
        "rss start MB": rss_start,
        **{f"rss at {10 * (i + 1)}% MB": v for i, v in enumerate(samples)},
        "pull keys/s": pulled / pull_s,
        "push keys/s": pushed / push_s,
        "applied rows/s": pushed / apply_s,
    }
    server.close()
    r.flushall()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument(
        "--grow-rows", type=int, default=0, help="run the growth test with this many rows"
    )
    parser.add_argument(
        "--budget", type=int, default=0, help="hot budget of the growth test (default rows/10)"
    )
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of a private one")
    parser.add_argument("--grow-child", choices=["memory", "ssd"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.grow_child:  # one growth case in a fresh process, so its RSS is its own
        budget = args.budget or args.grow_rows // 10
        with tempfile.TemporaryDirectory() as tmp:
            ssd = args.grow_child == "ssd"
            result = grow(
                args.redis_url,
                args.grow_rows,
                budget if ssd else None,
                args.dim,
                Path(tmp) if ssd else None,
            )
        print(json.dumps(result))
        return
    with private_redis() if args.redis_url is None else _given(args.redis_url) as url:
        r = redis.Redis.from_url(url)
        r.flushall()
        raw = raw_layouts(r, args.keys, args.dim)
        ps = ps_client_rates(url, args.keys, args.dim)
        print_table(
            f"Pull-view layouts, raw redis-py, {args.keys:,} keys of {args.dim * 4} B, "
            f"batches of {BATCH}",
            ["operation", "keys/s", "Redis bytes/key"],
            [
                ["MSET (key per row)", raw["MSET"], ""],
                ["MGET (key per row)", raw["MGET"], raw["mem/key MGET layout"]],
                ["HSET (bucketed hash)", raw["HSET bucketed"], ""],
                ["HMGET (bucketed hash)", raw["HMGET bucketed"], raw["mem/key bucketed"]],
            ],
        )
        print_table(
            "PSClient and shard server vs raw Redis (same keys, same value size)",
            ["operation", "keys/s", "ratio", "target"],
            [
                ["raw MGET, same keys (baseline)", ps["raw MGET"], 1.0, ""],
                ["PSClient.pull vs raw MGET", ps["pull"], ps["pull"] / ps["raw MGET"], ">= 0.9"],
                ["PSClient.push (XADD) vs MSET", ps["push"], ps["push"] / raw["MSET"], ""],
                ["server applied updates/s", ps["apply"], "", ""],
                [f"hot bytes/row (dim {args.dim}, adagrad)", ps["bytes/row"], "", "<= 200"],
            ],
        )
        if args.grow_rows:
            budget = args.budget or args.grow_rows // 10
            mem, ssd = (_grow_child(url, args, case) for case in ("memory", "ssd"))
            names = list(mem)
            rows = [[n, mem[n], ssd[n], ssd[n] / mem[n] if mem[n] else ""] for n in names]
            print_table(
                f"Growth to {args.grow_rows:,} rows: all in memory vs "
                f"hot budget {budget:,} + SSD tier",
                ["metric", "in memory", "budget+SSD", "ratio"],
                rows,
            )
            for name in ("pull keys/s", "push keys/s", "applied rows/s"):
                print(f"  throughput loss {name}: {1 - ssd[name] / mem[name]:.0%} (target <= 30%)")


def _grow_child(url: str, args: argparse.Namespace, case: str) -> dict[str, float]:
    cmd = [
        sys.executable,
        __file__,
        "--grow-child",
        case,
        "--redis-url",
        url,
        "--grow-rows",
        str(args.grow_rows),
        "--budget",
        str(args.budget),
        "--dim",
        str(args.dim),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


class _given:
    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> str:
        return self.url

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main()
