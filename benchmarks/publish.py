"""Publishing benchmark: base/delta publish time, subscriber apply rate, freshness.

Runs its own embedded broker + redis-server and two shard servers (threads), fills
the tables with ``--rows`` rows (dim 16 deep + dim 1 wide), then measures in ONE run:

- publish of a base (all rows) and of a delta (``--delta-rows`` changed rows);
- the baseline of the same run: producing the same number of payload bytes to the
  same topic as plain 1 MB messages (what any publisher must at least pay), so the
  ratio says what staging + chunking + checksums add;
- the subscriber's read + verify + apply rate for both versions, against a raw consume
  of the same messages (what any reader must at least pay);
- freshness at a ``--interval`` publish interval (default 1 s) for ``--seconds``:
  a pusher writes updates stamped with the current time, the publisher publishes
  every interval, a subscriber records apply time - newest event time per version;
  p50/p99 printed (target p99 <= 2 s).

- a consistent snapshot of the same tables (coordinator + shard export at the
  barrier, both shards, checksummed manifest).

    python benchmarks/publish.py                  # 1M rows
    python benchmarks/publish.py --rows 10000000  # 10M rows (needs ~6 GB RAM)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, private_stack

from pipeline.config import KafkaSettings
from pipeline.kafka import producer
from pipeline.model.modules import build_model, dense_state
from pipeline.model.spec import ModelSpec
from pipeline.ps.client import PSClient, TableRoute
from pipeline.ps.dense import push_dense
from pipeline.ps.server import ServerOptions, ShardServer
from pipeline.ps.spec import TableSpec
from pipeline.publish.publisher import Publisher
from pipeline.publish.subscriber import Subscriber
from pipeline.snapshot.coordinator import SnapshotCoordinator
from pipeline.topics import apply_topics, load_topic_specs

DIM = 16
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _fill(ps: PSClient, ids: np.ndarray, event_ms: int = 0) -> None:
    for lo in range(0, len(ids), 50_000):
        part = ids[lo : lo + 50_000]
        for table, dim in (("wide", 1), ("deep", DIM)):
            ps.push(table, part, np.ones((len(part), dim), np.float32), max_event_time=event_ms)
    ps.flush()


def _raw_produce(bootstrap: str, topic: str, nbytes: int) -> float:
    prod = producer(KafkaSettings(bootstrap=bootstrap), **{"message.max.bytes": 16 << 20})
    blob = bytes(1 << 20)
    began = time.perf_counter()
    for _ in range(max(1, nbytes >> 20)):
        prod.produce(topic, blob)
        prod.poll(0)
    prod.flush(60)
    return time.perf_counter() - began


def _raw_consume(bootstrap: str, topic: str) -> tuple[float, int]:
    """Seconds to read ``topic`` partition 0 from its beginning to its end, and the bytes."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "raw", "enable.auto.commit": False})
    _, high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
    c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    began, last, nbytes = time.perf_counter(), -1, 0
    while last < high - 1:
        for msg in c.consume(256, 1.0):
            if msg.error() is None:
                last, nbytes = msg.offset(), nbytes + len(msg.value() or b"")
    seconds = time.perf_counter() - began
    c.close()
    return seconds, nbytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--delta-rows", type=int, default=100_000)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    with private_stack("publish-bench-") as (stack, work):
        apply_topics({"bootstrap.servers": stack.bootstrap}, load_topic_specs(), prefix="b.")
        topic = "b.model.updates"
        specs = [
            TableSpec.from_dict({"name": n, "dim": d, "accessor": {"admit_threshold": 0.0}})
            for n, d in (("wide", 1), ("deep", DIM))
        ]
        model = ModelSpec(kind="wide_deep", slots=("a",), dense_dim=0, deep_dim=DIM, hidden=(64,))
        client = redis.Redis.from_url(stack.redis_url)
        servers = [
            ShardServer(
                redis.Redis.from_url(stack.redis_url), specs, s, 2, ServerOptions(block_ms=5)
            )
            for s in range(2)
        ]
        stop = threading.Event()
        threads = [threading.Thread(target=s.run, args=(stop,), daemon=True) for s in servers]
        for t in threads:
            t.start()
        routes = {"wide": TableRoute(1, 2), "deep": TableRoute(DIM, 2)}
        ps = PSClient(client, routes, max_inflight=64)
        ids = np.arange(args.rows, dtype=np.uint64) * GOLDEN
        t0 = time.perf_counter()
        _fill(ps, ids)
        fill_s = time.perf_counter() - t0
        push_dense(client, model.dense_table_name(), dense_state(build_model(model)))
        kafka = KafkaSettings(bootstrap=stack.bootstrap)
        pub = Publisher(client, producer(kafka), topic, model, base_every=1_000_000)
        base = pub.publish()
        _fill(ps, ids[: args.delta_rows])
        delta = pub.publish()
        raw_s = _raw_produce(stack.bootstrap, "b.metrics", base.payload_bytes)
        read_s, read_bytes = _raw_consume(stack.bootstrap, topic)
        snap_dir = work / "snapshots"
        coordinator = SnapshotCoordinator(
            client, snap_dir, tables=["wide", "deep"], dense=[model.dense_table_name()]
        )
        t0 = time.perf_counter()
        taken = coordinator.take()
        snap_s = time.perf_counter() - t0
        coordinator.release()
        snap_mb = sum(f.stat().st_size for f in taken.path.rglob("*") if f.is_file()) / 1e6
        shutil.rmtree(snap_dir, ignore_errors=True)
        sub = Subscriber.connect(kafka, topic, model)
        t0 = time.perf_counter()
        while sub.live is None or sub.live.version < delta.version:
            sub.poll(0.2)
        apply_s = time.perf_counter() - t0
        rows_applied = sum(base.rows.values()) + sum(delta.rows.values())
        # freshness at the publish interval
        fresh: list[float] = []
        pusher_stop = threading.Event()

        def pusher() -> None:
            rng = np.random.default_rng(0)
            while not pusher_stop.is_set():
                part = ids[rng.integers(0, len(ids), 2_000)]
                _fill(ps, np.unique(part), int(time.time() * 1000))
                time.sleep(0.05)

        def publisher() -> None:
            while not pusher_stop.is_set():
                began = time.monotonic()
                pub.publish()
                pusher_stop.wait(max(0.0, args.interval - (time.monotonic() - began)))

        workers = [threading.Thread(target=pusher), threading.Thread(target=publisher)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            for event in sub.poll(0.2):
                if event.status == "applied" and event.freshness_ms is not None:
                    fresh.append(event.freshness_ms / 1000)
        pusher_stop.set()
        for w in workers:
            w.join(60)
        sub.close()
        stop.set()
        for t in threads:
            t.join(10)
        mb = base.payload_bytes / 1e6
        rows = [
            ["fill tables (push + apply)", f"{args.rows:,}", f"{fill_s:.2f}", "-"],
            ["raw produce of the base's bytes (baseline)", f"{mb:.0f} MB", f"{raw_s:.2f}", "1.00"],
            [
                "publish base",
                f"{sum(base.rows.values()):,}",
                f"{base.seconds:.2f}",
                f"{base.seconds / raw_s:.2f}",
            ],
            [
                "publish delta",
                f"{sum(delta.rows.values()):,}",
                f"{delta.seconds:.2f}",
                f"{delta.seconds / raw_s:.2f}",
            ],
            [
                "snapshot (both shards, checksummed)",
                f"{sum(taken.rows.values()):,}",
                f"{snap_s:.2f}",
                f"{snap_s / raw_s:.2f}",
            ],
            [
                f"raw consume of model.updates ({read_bytes / 1e6:.0f} MB, from the start)",
                "-",
                f"{read_s:.2f}",
                f"{read_s / raw_s:.2f}",
            ],
            [
                "subscriber read + apply (base + delta)",
                f"{rows_applied:,}",
                f"{apply_s:.2f}",
                f"{apply_s / raw_s:.2f}",
            ],
        ]
        print_table(
            f"Publishing, {args.rows:,} rows (wide dim 1 + deep dim {DIM}), 2 shards",
            ["step", "rows", "seconds", "x raw produce"],
            rows,
        )
        print(
            f"  subscriber apply rate: {rows_applied / apply_s:,.0f} rows/s; "
            f"{apply_s / read_s:.1f}x a raw consume of the same messages"
        )
        print(f"  snapshot: {snap_mb:.0f} MB on disk")
        if fresh:
            p50, p99 = np.percentile(fresh, [50, 99])
            print(
                f"  freshness at a {args.interval:g} s interval over {len(fresh)} versions: "
                f"p50 {p50:.2f} s, p99 {p99:.2f} s (target p99 <= 2 s)"
            )
        else:
            print("  freshness: no version applied during the window")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
