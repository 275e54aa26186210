"""Joiner throughput, CPU per event, checkpoint pauses and memory, through a real broker.

Usage::

    flock "$HOME/.heavy.lock" python benchmarks/joiner.py [--impressions N] [--profile]
    flock "$HOME/.heavy.lock" python benchmarks/joiner.py --minutes 10 --rate R

Starts its own embedded stack (tansu broker + redis-server, free ports, temp dir).

**Backlog mode** (default): pre-produces ``--impressions`` impressions and their
clicks from the synthetic generator (``TrafficGenerator.events``), keyed by request
id, plus one far-future sentinel pair per partition (it moves every watermark past
the real windows, so all real samples come out as soon as the input is read). Then,
in the same run:

* **raw consume** (the baseline): a confluent-kafka consumer reads both topics from
  the start, touching each message's value, no decoding: events/s and CPU seconds;
* **joiner**: ``pipeline join`` as a subprocess (its CPU time is its own, read from
  ``/proc/<pid>/stat``), from the moment it has its partitions (its "starting fresh"
  log line) until every impression's sample is on ``samples``: events/s (wall),
  events per CPU second (per core), the ratio of that to the raw consume's, whether
  the samples are exactly one per impression, the checkpoint rounds' pauses (its
  ``checkpoint cut in X ms`` log lines) and its RSS at start and end.

``--profile`` also runs the engine core (decode, join, batch, encode) in this
process under cProfile on the same messages and prints where the time goes.

**Paced mode** (``--minutes M --rate R``): produces generator events at ``R``
impressions per second with event times at the wall clock (clicks at their own
times, within the attribution window ``--window-s``), runs ``pipeline join`` with
that window and retention, and prints the joiner's RSS, CPU and held keys every
minute: with a steady rate, memory must stop growing once the window plus the
retention has passed.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import os
import re
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, private_stack

from pipeline.codec import avro
from pipeline.config import KafkaSettings
from pipeline.ingest.generator import TrafficGenerator
from pipeline.ingest.replay import DeliveryErrors, produce_waiting
from pipeline.kafka import producer as make_producer
from pipeline.topics import apply_topics, load_topic_specs

PREFIX = "jb."
SLOTS = "user_id,item_id,category,device,position"
_TICK = os.sysconf("SC_CLK_TCK")


# -- process probes ---------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class JoinerProcess:
    """``pipeline join`` as a subprocess, its log lines timestamped as they arrive."""

    proc: subprocess.Popen[str]
    lines: list[tuple[float, str]] = field(default_factory=list)
    ready_at: float | None = None
    ready_cpu: float = 0.0
    ready_rss: float = 0.0

    @classmethod
    def start(cls, bootstrap: str, window_ms: int, retention_ms: int, interval_s: float) -> Any:
        env = {
            **os.environ,
            "PIPELINE_KAFKA_BOOTSTRAP": bootstrap,
            "PIPELINE_KAFKA_SESSION_TIMEOUT_MS": "3000",
            "PIPELINE_TOPICS_PREFIX": PREFIX,
            "PIPELINE_JOINER_SLOTS": SLOTS,
            "PIPELINE_JOINER_WINDOW_MS": str(window_ms),
            "PIPELINE_JOINER_RETENTION_MS": str(retention_ms),
            "PIPELINE_JOINER_LATENESS_MS": "1000",
            "PIPELINE_JOINER_IDLE_MS": "5000",
            "PIPELINE_JOINER_CHECKPOINT_INTERVAL_S": str(interval_s),
            "PIPELINE_THREADS": "1",
        }
        cmd = [sys.executable, "-m", "pipeline.cli", "--log-level", "INFO", "join"]
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        me = cls(proc)
        threading.Thread(target=me._read, daemon=True).start()
        return me

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            now = time.perf_counter()
            if self.ready_at is None and "starting fresh" in line:
                self.ready_cpu = cpu_s(self.proc.pid)
                self.ready_rss = rss_mb(self.proc.pid)
                self.ready_at = now
            self.lines.append((now, line.rstrip()))

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.ready_at is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.fail("no partitions assigned")
            time.sleep(0.01)

    def cuts_ms(self, cpu: bool = False) -> list[float]:
        """Wall (or CPU) milliseconds of every checkpoint cut the joiner logged."""
        pattern = r"checkpoint cut in ([0-9.]+) ms \(([0-9.]+) ms CPU"
        found = (re.search(pattern, line) for _, line in self.lines)
        return [float(m.group(2 if cpu else 1)) for m in found if m]

    def stats(self) -> dict[str, Any]:
        """The joiner's last logged stats (held keys, state bytes ...)."""
        for _, line in reversed(self.lines):
            if "checkpoint cut in" in line and "{" in line:
                import ast

                stats: dict[str, Any] = ast.literal_eval(line[line.index("{") :])
                return stats
        return {}

    def stop(self) -> str:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=120)
        return out

    def fail(self, what: str) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        tail = "\n".join(line for _, line in self.lines[-20:])
        raise SystemExit(f"joiner: {what} (exit {self.proc.returncode})\n{tail}")


# -- topics -----------------------------------------------------------------------------


def make_topics(bootstrap: str) -> int:
    specs = [s for s in load_topic_specs() if s.name.startswith(("events.", "samples"))]
    apply_topics({"bootstrap.servers": bootstrap}, specs, prefix=PREFIX)
    return next(s.partitions for s in specs if s.name == "events.impressions")


def produce_backlog(settings: KafkaSettings, n: int, window_ms: int, partitions: int) -> int:
    """n impressions and their clicks, then a far-future sentinel pair per partition."""
    gen = TrafficGenerator(seed=7, attribution_window_ms=window_ms, rate=20_000.0)
    log = gen.events(n)
    prod, errors = make_producer(settings), DeliveryErrors()
    imps, clks = f"{PREFIX}events.impressions", f"{PREFIX}events.clicks"
    # impressions first, then clicks: the clicks are read after most impressions
    for rec in log.impressions:
        produce_waiting(
            prod,
            imps,
            avro.encode("Impression", rec),
            key=rec["request_id"].encode(),
            on_delivery=errors,
        )
    for rec in log.clicks:
        produce_waiting(
            prod,
            clks,
            avro.encode("Click", rec),
            key=rec["request_id"].encode(),
            on_delivery=errors,
        )
    far = max(r["event_time"] for r in log.impressions) + 100 * window_ms
    for p in range(partitions):  # an impression and an unrelated click, so both streams move
        imp = {"request_id": f"sentinel-{p}", "user_id": "s", "item_id": "s", "event_time": far}
        clk = {**imp, "request_id": f"sentinel-click-{p}"}
        produce_waiting(
            prod,
            imps,
            avro.encode("Impression", {**imp, "features": {}}),
            partition=p,
            on_delivery=errors,
        )
        produce_waiting(prod, clks, avro.encode("Click", clk), partition=p, on_delivery=errors)
    if prod.flush(120) or errors:
        raise SystemExit(f"producing the backlog failed: {errors[:3]}")
    return n + len(log.clicks) + 2 * partitions


def raw_consume(settings: KafkaSettings, expected: int) -> tuple[float, float]:
    """Seconds (wall, CPU) for a plain consumer to read ``expected`` events."""
    from confluent_kafka import Consumer, TopicPartition

    cons = Consumer(
        {
            **settings.client_config(),
            "group.id": "jb-raw",
            "enable.auto.commit": False,
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": 16 * 1024 * 1024,
        }
    )
    tps = []
    for topic in (f"{PREFIX}events.impressions", f"{PREFIX}events.clicks"):
        parts = cons.list_topics(topic, timeout=10).topics[topic].partitions
        tps += [TopicPartition(topic, p, 0) for p in parts]
    cons.assign(tps)
    got = size = 0
    cpu0, wall0 = own_cpu_s(), time.perf_counter()
    while got < expected:
        for msg in cons.consume(num_messages=10_000, timeout=1.0):
            if msg.error() is None:
                size += len(msg.value() or b"")
                got += 1
    wall, cpu = time.perf_counter() - wall0, own_cpu_s() - cpu0
    cons.close()
    return wall, cpu


class SampleCounter:
    """Counts rows on ``samples`` (all partitions) and checks each join key once."""

    def __init__(self, settings: KafkaSettings) -> None:
        from confluent_kafka import Consumer, TopicPartition

        self.cons = Consumer(
            {**settings.client_config(), "group.id": "jb-out", "enable.auto.commit": False}
        )
        topic = f"{PREFIX}samples"
        parts = self.cons.list_topics(topic, timeout=10).topics[topic].partitions
        self.cons.assign([TopicPartition(topic, p, 0) for p in parts])
        self.keys: list[np.ndarray] = []
        self.rows = 0
        self.first_at: float | None = None

    def poll(self, timeout: float = 0.05) -> None:
        for msg in self.cons.consume(num_messages=1000, timeout=timeout):
            if msg.error() is not None:
                continue
            keys = dict(msg.headers() or [])["joiner.keys"]
            self.keys.append(np.frombuffer(keys, dtype="<u8"))
            self.rows += len(self.keys[-1])
            if self.first_at is None:
                self.first_at = time.perf_counter()

    def distinct(self) -> int:
        return len(np.unique(np.concatenate(self.keys))) if self.keys else 0


# -- backlog mode -------------------------------------------------------------------------


def backlog(bootstrap: str, args: argparse.Namespace) -> None:
    settings = KafkaSettings(bootstrap=bootstrap, session_timeout_ms=3000)
    partitions = make_topics(bootstrap)
    t = time.perf_counter()
    events = produce_backlog(settings, args.impressions, args.window_s * 1000, partitions)
    print(
        f"produced {events:,} events ({args.impressions:,} impressions) in "
        f"{time.perf_counter() - t:.1f} s"
    )
    raw_wall, raw_cpu = raw_consume(settings, events)

    out = SampleCounter(settings)
    joiner = JoinerProcess.start(
        bootstrap, args.window_s * 1000, args.window_s * 1000, args.interval_s
    )
    try:
        joiner.wait_ready()
        deadline = time.monotonic() + 600
        while out.rows < args.impressions:
            out.poll()
            if joiner.proc.poll() is not None or time.monotonic() > deadline:
                joiner.fail(f"only {out.rows} of {args.impressions} samples came out")
        end, end_cpu, end_rss = time.perf_counter(), cpu_s(joiner.proc.pid), rss_mb(joiner.proc.pid)
        time.sleep(1.0)
        out.poll(0.5)
        extra = out.rows - args.impressions
        stats = joiner.stats()
        joiner.stop()
    finally:
        if joiner.proc.poll() is None:
            joiner.proc.kill()
    assert joiner.ready_at is not None
    wall = end - joiner.ready_at
    cpu = end_cpu - joiner.ready_cpu
    exact = out.rows == args.impressions and out.distinct() == args.impressions
    raw_per_cpu = events / raw_cpu
    join_per_cpu = events / cpu
    rows = [
        ("raw consume (baseline)", events / raw_wall, raw_per_cpu, raw_cpu, "1.00x", "", ""),
        (
            "pipeline join",
            events / wall,
            join_per_cpu,
            cpu,
            f"{join_per_cpu / raw_per_cpu:.2f}x",
            f"{joiner.ready_rss:.0f} -> {end_rss:.0f}",
            "yes" if exact else f"NO ({out.rows} rows, {extra} after the end)",
        ),
    ]
    print_table(
        f"Joiner, {events:,} events ({args.impressions:,} impressions, "
        f"{events - args.impressions:,} clicks), embedded broker at {bootstrap}",
        [
            "stage",
            "events/s wall",
            "events/CPU-s",
            "CPU s",
            "per-core vs raw",
            "RSS MB",
            "1 sample per impression",
        ],
        rows,
    )
    report_cuts(joiner, args.interval_s)
    print(f"  joiner state at the last round: {stats}")
    if args.profile:
        profile(settings, events)


def report_cuts(joiner: JoinerProcess, interval_s: float) -> None:
    """Checkpoint pauses: wall time (what consumption waited) and the cut's CPU time."""
    wall, cpu = joiner.cuts_ms(), joiner.cuts_ms(cpu=True)
    if not wall:
        return
    q, c = np.percentile(wall, [50, 99]), np.percentile(cpu, [50, 99])
    print(
        f"  checkpoint cuts (one partition each, a round every {interval_s} s): {len(wall)}, "
        f"consumption paused p50 {q[0]:.1f} ms, p99 {q[1]:.1f} ms, max {max(wall):.1f} ms; "
        f"CPU p50 {c[0]:.1f} ms, p99 {c[1]:.1f} ms, max {max(cpu):.1f} ms"
    )


def profile(settings: KafkaSettings, events: int) -> None:
    """The engine core under cProfile on the backlog's messages (no broker in the timing)."""
    import cProfile
    import pstats

    from confluent_kafka import Consumer, TopicPartition

    from pipeline.joiner.engine import JoinEngine
    from pipeline.joiner.output import SampleBatcher
    from pipeline.joiner.runner import join_config, topics_for
    from pipeline.joiner.settings import JoinerSettings

    cons = Consumer(
        {**settings.client_config(), "group.id": "jb-prof", "enable.auto.commit": False}
    )
    tps = []
    for topic in (f"{PREFIX}events.impressions", f"{PREFIX}events.clicks"):
        parts = cons.list_topics(topic, timeout=10).topics[topic].partitions
        tps += [TopicPartition(topic, p, 0) for p in parts]
    cons.assign(tps)
    polls: list[list[Any]] = []
    got = 0
    while got < events:
        msgs = [m for m in cons.consume(num_messages=10_000, timeout=1.0) if m.error() is None]
        got += len(msgs)
        polls.append([(m.topic(), m.partition(), m.offset(), m.key(), m.value()) for m in msgs])
    cons.close()
    js = JoinerSettings(slots=SLOTS, window_ms=600_000, lateness_ms=1000)
    topics = topics_for(js, PREFIX)
    engine = JoinEngine(join_config(js), topics, SampleBatcher(js.slot_config(), 6, 1024, 200), 1)
    for p in range(6):
        engine.assign(p, None, 0)
    prof = cProfile.Profile()
    cpu0 = own_cpu_s()
    prof.enable()
    for poll in polls:
        cols = list(zip(*poll, strict=True))
        offsets, keys = cols[2], cols[3]
        engine.handle_many(cols[0], cols[1], cols[4], 0, offsets.__getitem__, keys.__getitem__)
    engine.drain()
    prof.disable()
    cpu = own_cpu_s() - cpu0
    print(
        f"\nengine core under cProfile: {events:,} events in {cpu:.2f} CPU s "
        f"({events / cpu:,.0f} events/CPU-s with profiling overhead)"
    )
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


# -- paced mode ---------------------------------------------------------------------------


def paced_events(
    rate: float, minutes: float, window_ms: int
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(due wall ms, kind, record) in time order, generated a minute at a time."""
    start = int(time.time() * 1000) + 2000
    chunk_n = int(rate * 60)
    pending: list[tuple[int, int, str, dict[str, Any]]] = []
    seq = 0
    for k in range(int(np.ceil(minutes))):
        gen = TrafficGenerator(
            seed=100 + k,
            rate=rate,
            start_time_ms=start + k * 60_000,
            attribution_window_ms=window_ms,
            mean_click_delay_ms=max(1, window_ms // 4),
        )
        log = gen.events(chunk_n)
        for rec in log.impressions:
            rec["request_id"] = f"m{k}-{rec['request_id']}"
            heapq.heappush(pending, (rec["event_time"], seq, "impression", rec))
            seq += 1
        for rec in log.clicks:
            rec["request_id"] = f"m{k}-{rec['request_id']}"
            heapq.heappush(pending, (rec["event_time"], seq, "click", rec))
            seq += 1
        horizon = start + (k + 1) * 60_000
        while pending and pending[0][0] < horizon:
            due, _, kind, rec = heapq.heappop(pending)
            yield due, kind, rec
    end = start + int(minutes * 60_000)
    while pending and pending[0][0] < end:
        due, _, kind, rec = heapq.heappop(pending)
        yield due, kind, rec


def paced(bootstrap: str, args: argparse.Namespace) -> None:
    settings = KafkaSettings(bootstrap=bootstrap, session_timeout_ms=3000)
    make_topics(bootstrap)
    window_ms = args.window_s * 1000
    joiner = JoinerProcess.start(bootstrap, window_ms, window_ms, args.interval_s)
    stop = threading.Event()
    sent = [0]

    def feed() -> None:
        prod, errors = make_producer(settings), DeliveryErrors()
        for due, kind, rec in paced_events(args.rate, args.minutes, window_ms):
            if stop.is_set():
                break
            wait = due / 1000 - time.time()
            if wait > 0:
                time.sleep(wait)
            name = "Impression" if kind == "impression" else "Click"
            produce_waiting(
                prod,
                f"{PREFIX}events.{kind}s",
                avro.encode(name, rec),
                key=rec["request_id"].encode(),
                on_delivery=errors,
            )
            sent[0] += 1
        prod.flush(60)

    feeder = threading.Thread(target=feed, daemon=True)
    rows = []
    try:
        joiner.wait_ready()
        feeder.start()
        pid = joiner.proc.pid
        cpu0, t0 = cpu_s(pid), time.perf_counter()
        rows.append((0, sent[0], rss_mb(pid), 0.0, "", ""))
        for minute in range(1, int(args.minutes) + 1):
            while time.perf_counter() < t0 + 60 * minute:
                if joiner.proc.poll() is not None:
                    joiner.fail("exited")
                time.sleep(0.5)
            stats = joiner.stats()
            cpu = cpu_s(pid) - cpu0
            rows.append(
                (
                    minute,
                    sent[0],
                    rss_mb(pid),
                    cpu / (60 * minute),
                    stats.get("remembered", ""),
                    stats.get("state_bytes", ""),
                )
            )
            print(
                f"  minute {minute}: {sent[0]:,} events sent, joiner RSS {rows[-1][2]:.0f} MB, "
                f"CPU {rows[-1][3]:.2f} cores, held keys {rows[-1][4]}",
                flush=True,
            )
        stop.set()
        joiner.stop()
    finally:
        stop.set()
        if joiner.proc.poll() is None:
            joiner.proc.kill()
    print_table(
        f"Joiner paced at {args.rate:,.0f} impressions/s (+ clicks) for {args.minutes} min, "
        f"window = retention = {args.window_s} s",
        ["minute", "events sent", "RSS MB", "CPU (cores)", "held keys", "state bytes"],
        rows,
    )
    report_cuts(joiner, args.interval_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impressions", type=int, default=200_000)
    parser.add_argument(
        "--window-s",
        type=int,
        default=None,
        help="attribution window = retention [backlog 600, paced 60]",
    )
    parser.add_argument("--interval-s", type=float, default=2.0, help="checkpoint interval")
    parser.add_argument("--profile", action="store_true", help="cProfile the engine core")
    parser.add_argument("--minutes", type=float, default=0, help="paced run of this length")
    parser.add_argument("--rate", type=float, default=5000, help="paced impressions/s")
    args = parser.parse_args(argv)
    if args.window_s is None:
        args.window_s = 60 if args.minutes else 600
    with private_stack("joiner-bench-") as (stack, _tmp), contextlib.suppress(KeyboardInterrupt):
        (paced if args.minutes else backlog)(stack.bootstrap, args)


if __name__ == "__main__":
    main()
