"""The joiner end to end on the real broker, killed and restarted mid-run.

A deterministic generator writes impressions and clicks (positives, clicks after
the window, clicks after their window closed, duplicates, orphans, malformed
bytes) in three phases. ``pipeline join`` runs as a subprocess: run 1 is SIGKILLed
before it ever checkpoints after its start (so everything it emitted is replayed
by run 2 and must be deduplicated), run 2 is stopped with SIGTERM while windows
are still open, run 3 resumes them. The samples on the topic must then be exactly
the expected ones, each once, with the expected weights and feature ids, and
every malformed or orphan event must be in the dead-letter topic once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import xxhash
from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.codec import avro
from pipeline.codec.hashing import hash64
from pipeline.codec.samplebatch import decode_batch
from pipeline.codec.slots import SlotConfig
from tests.procgroups import ProcessGroups

pytestmark = [pytest.mark.integration, pytest.mark.slow]

T0 = 1_700_000_000_000
WINDOW, LATENESS, RATE = 1000, 200, 0.5
SLOTS = SlotConfig(("user_id", "item_id", "city", "device"))
NEG, POS, CORR = 0, 1, 2
PARTITIONS = 6  # of events.impressions and events.clicks (topics/*.yaml)


def key_hash(rid: str, item: str) -> int:
    return xxhash.xxh64_intdigest(f"{rid}\x1f{item}".encode(), 0)


def kept(rid: str, item: str) -> bool:
    """The documented downsampling draw, recomputed independently of the joiner."""
    return xxhash.xxh64_intdigest(f"{rid}\x1f{item}".encode(), 1) < RATE * 2**64


@dataclass
class Generator:
    """Deterministic events plus the samples and dead letters they must produce."""

    # Request q<i> goes to partition i % PARTITIONS of both topics (explicitly, so each
    # partition's watermark is known): (partition, key, value), clicks with their time.
    impressions: list[tuple[int, bytes, bytes]] = field(default_factory=list)
    clicks: list[tuple[int, int, bytes, bytes]] = field(default_factory=list)
    malformed: list[tuple[str, int, bytes]] = field(default_factory=list)
    expected: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    late_clicks: int = 0
    duplicates: Counter[str] = field(default_factory=Counter)

    @staticmethod
    def when(i: int) -> int:
        """Event time of impression i; phases (A < 120 <= B < 200 <= C) are 2 s apart."""
        return T0 + 20 * i + 2000 * ((i >= 120) + (i >= 200))

    def impression(self, i: int) -> tuple[str, str]:
        rid, user, item = f"q{i}", f"u{i % 13}", f"it{i % 4}"
        feats = {"city": f"c{i % 5}", "device": ("ios", "android")[i % 2], "unknown": "x"}
        rec = {"request_id": rid, "user_id": user, "item_id": item, "event_time": self.when(i)}
        value = avro.encode("Impression", {**rec, "features": feats})
        copies = 2 if i % 10 == 3 else 1
        self.impressions += [(i % PARTITIONS, rid.encode(), value)] * copies
        self.duplicates["impressions"] += copies - 1
        ids = {s: hash64(s, v) for s, v in (("user_id", user), ("item_id", item))}
        ids |= {s: hash64(s, feats[s]) for s in ("city", "device")}
        self._expect(rid, item, NEG, key=(rid, item), ids=ids, event_time=self.when(i))
        return rid, item

    def click(self, i: int, delay: int, copies: int = 1) -> None:
        rid, user, item = f"q{i}", f"u{i % 13}", f"it{i % 4}"
        t = self.when(i) + delay
        rec = {"request_id": rid, "user_id": user, "item_id": item, "event_time": t}
        self.clicks += [(t, i % PARTITIONS, rid.encode(), avro.encode("Click", rec))] * copies
        self.duplicates["clicks"] += copies - 1

    def _expect(self, rid: str, item: str, kind: int, **info: Any) -> None:
        h = key_hash(rid, item)
        if kind == NEG:
            self.expected[(h, NEG)] = info
        elif kind == POS:
            self.expected[(h, POS)] = self.expected.pop((h, NEG))
        else:
            self.expected[(h, CORR)] = self.expected.get((h, NEG), {})

    def phase(
        self, lo: int, hi: int, clicks_below: int = 1 << 30, late_below: int = 1 << 30
    ) -> None:
        """Impressions lo..hi-1 with their clicks (in-window, after-window, duplicate).

        Every 5th request is clicked in its window (so every partition's click stream
        moves on), every 15th twice. No clicks from ``clicks_below`` on and none after
        the window from ``late_below`` on: a click stream that runs ahead closes
        windows (that is the watermark), so windows meant to stay open must not have
        later clicks in front of them.
        """
        for i in range(lo, hi):
            rid, item = self.impression(i)
            if i >= clicks_below:
                continue
            if i % 5 == 0:
                self.click(i, 400, copies=2 if i % 15 == 0 else 1)
                self._expect(rid, item, POS)
            elif i % 7 == 1 and i < late_below:
                self.click(i, WINDOW + 500)  # after the window by event time
                self.late_clicks += 1
                self._expect(rid, item, CORR)

    def in_window_click(self, i: int) -> None:
        """A click inside i's window, for an impression that is still open."""
        self.click(i, 600)
        self._expect(f"q{i}", f"it{i % 4}", POS)

    def stream_late_click(self, i: int) -> None:
        """A click inside i's window by event time that arrives after the window closed."""
        self.click(i, 300)
        self.late_clicks += 1
        self._expect(f"q{i}", f"it{i % 4}", CORR)

    def orphans_and_garbage(self) -> None:
        for k in range(3):
            rec = {"request_id": f"ghost{k}", "user_id": "u", "item_id": "x", "event_time": T0}
            ghost = avro.encode("Click", rec)
            self.clicks.append((T0 + k, k % PARTITIONS, f"ghost{k}".encode(), ghost))
        bad_user = {"request_id": "r", "user_id": "", "item_id": "x", "event_time": T0}
        self.malformed += [
            ("impressions", 0, b"garbage impression"),
            ("impressions", 1, b"\x02\x04"),
            ("clicks", 2, b"\xffnot avro"),
            ("impressions", 3, self.clicks[0][3]),  # a Click on the impressions topic
            ("impressions", 4, avro.encode("Impression", {**bad_user, "features": {}})),
        ]

    def expected_rows(self) -> dict[tuple[int, int], dict[str, Any]]:
        rows = {}
        for (h, kind), info in self.expected.items():
            rid, item = info["key"]
            if kind != NEG or kept(rid, item):
                rows[(h, kind)] = info
        return rows


class Produced:
    """Produces generator events and remembers where malformed ones landed."""

    def __init__(self, conf: dict[str, object], topics: dict[str, str]) -> None:
        self.producer = Producer(dict(conf))
        self.topics = topics
        self.dead: set[tuple[str, int, int]] = set()

    def send(self, gen: Generator) -> None:
        def remember(err: Any, msg: Any) -> None:
            assert err is None, err
            self.dead.add((msg.topic(), msg.partition(), msg.offset()))

        imps, clicks = self.topics["events.impressions"], self.topics["events.clicks"]
        for part, key, value in gen.impressions:
            self.producer.produce(imps, value, key=key, partition=part)
        for _, part, key, value in sorted(gen.clicks, key=lambda c: c[0]):
            on_delivery = remember if key.startswith(b"ghost") else None
            self.producer.produce(clicks, value, key=key, partition=part, on_delivery=on_delivery)
        for stream, part, value in gen.malformed:
            topic = self.topics[f"events.{stream}"]
            self.producer.produce(topic, value, key=b"bad", partition=part, on_delivery=remember)
        assert self.producer.flush(30) == 0
        gen.impressions.clear()
        gen.clicks.clear()
        gen.malformed.clear()


class Output:
    """Everything on samples and samples.dlq so far (read from offset 0, all partitions)."""

    def __init__(
        self, conf: dict[str, object], topics: dict[str, str], slots: SlotConfig = SLOTS
    ) -> None:
        self.slots = slots
        self.consumer = Consumer({**conf, "group.id": "unused", "enable.auto.commit": False})
        samples, dlq = topics["samples"], topics["samples.dlq"]
        parts = self.consumer.list_topics(samples, timeout=10).topics[samples].partitions
        self.consumer.assign(
            [TopicPartition(samples, p, 0) for p in parts] + [TopicPartition(dlq, 0, 0)]
        )
        self.samples_topic = samples
        self.rows: list[tuple[int, int, float, float, int, dict[str, list[int]]]] = []
        self.dead: list[dict[str, Any]] = []

    def poll(self, seconds: float = 0.3) -> None:
        for msg in self.consumer.consume(num_messages=1000, timeout=seconds):
            assert not msg.error(), msg.error()
            if msg.topic() != self.samples_topic:
                self.dead.append(avro.decode("DeadLetter", msg.value()))
                continue
            headers = dict(msg.headers() or [])
            keys = np.frombuffer(headers["joiner.keys"], dtype="<u8").tolist()
            kinds = list(headers["joiner.kinds"])
            batch = decode_batch(msg.value(), self.slots)
            for r in range(batch.num_rows):
                ids = {s: v.tolist() for s, v in batch.row_features(r).items()}
                row = (keys[r], kinds[r], float(batch.labels[r]), float(batch.weights[r]))
                self.rows.append((*row, int(batch.event_times[r]), ids))

    def wait(
        self, what: str, done: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 45
    ) -> None:
        """Poll until ``done()``; fail with the joiner's stderr if it exits or time runs out."""
        deadline = time.monotonic() + timeout
        while not done():
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                err = proc.communicate()[1][-3000:]
                pytest.fail(f"waiting for {what}: joiner exit code {proc.returncode}, {err}")
            self.poll()

    def keys(self) -> set[tuple[int, int]]:
        return {(r[0], r[1]) for r in self.rows}

    def close(self) -> None:
        self.consumer.close()


def start_joiner(
    processes: ProcessGroups,
    env: dict[str, str],
    checkpoint_s: float,
    idle_ms: int,
    engine: str = "confluent",
) -> subprocess.Popen[str]:
    run_env = {
        **env,
        "PIPELINE_JOINER_ENGINE": engine,
        "PIPELINE_JOINER_CHECKPOINT_INTERVAL_S": str(checkpoint_s),
        "PIPELINE_JOINER_IDLE_MS": str(idle_ms),
    }
    code = "from pipeline.cli.join import join; join()"
    return processes.start(
        [sys.executable, "-c", code],
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_joiner(proc: subprocess.Popen[str]) -> dict[str, int]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    last = [line for line in out.splitlines() if "{" in line][-1]  # faust adds tty codes
    counters: dict[str, int] = json.loads(last[last.index("{") :])
    return counters


def joiner_env(
    kafka_bootstrap: str, kafka_conf: dict[str, object], topics: dict[str, str], unique: str
) -> dict[str, str]:
    """Environment of a joiner subprocess for this test's topics."""
    meta = Producer(dict(kafka_conf)).list_topics(topics["events.clicks"], timeout=10)
    assert len(meta.topics[topics["events.clicks"]].partitions) == PARTITIONS
    return {
        **os.environ,
        "PIPELINE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "PIPELINE_KAFKA_SESSION_TIMEOUT_MS": "3000",
        "PIPELINE_TOPICS_PREFIX": topics["samples"][: -len("samples")],
        "PIPELINE_JOINER_APP_ID": f"joiner-{unique}",
        "PIPELINE_JOINER_SLOTS": ",".join(SLOTS.slots),
        "PIPELINE_JOINER_WINDOW_MS": str(WINDOW),
        "PIPELINE_JOINER_LATENESS_MS": str(LATENESS),
        "PIPELINE_JOINER_RETENTION_MS": "60000",
        "PIPELINE_JOINER_NEGATIVE_RATE": str(RATE),
        "PIPELINE_JOINER_LATE_CORRECTIONS": "true",
        "PIPELINE_JOINER_BATCH_SIZE": "16",
        "PIPELINE_JOINER_LINGER_MS": "50",
    }


def check_rows(output: Output, expected: dict[tuple[int, int], dict[str, Any]]) -> None:
    """Exactly the expected samples, each once, labelled and weighted as documented."""
    assert Counter((r[0], r[1]) for r in output.rows) == Counter(expected.keys())
    for key_h, kind, label, weight, event_time, ids in output.rows:
        info = expected[(key_h, kind)]
        assert (label, weight) == ((0.0, 1 / RATE) if kind == NEG else (1.0, 1.0))
        assert event_time == info["event_time"]
        assert ids == {s: [v] for s, v in info["ids"].items()}


def check_dead_letters(output: Output, produced: Produced) -> None:
    """Every malformed and orphan event dead-lettered once, with its origin and reason."""
    dead_at = Counter(
        (d["source_topic"], d["source_partition"], d["source_offset"]) for d in output.dead
    )
    assert dead_at == Counter(produced.dead)
    reasons = Counter(d["reason"] for d in output.dead)
    assert reasons == {"avro_decode": 4, "invalid_event": 1, "orphan_click": 3}


def test_join_survives_kill_and_restart_with_exact_output(
    kafka_bootstrap: str,
    kafka_conf: dict[str, object],
    project_topics: dict[str, str],
    unique: str,
    processes: ProcessGroups,
) -> None:
    env = joiner_env(kafka_bootstrap, kafka_conf, project_topics, unique)
    gen, produced = Generator(), Produced(kafka_conf, project_topics)
    output = Output(kafka_conf, project_topics)
    procs: list[subprocess.Popen[str]] = []
    try:
        # Run 1: phase A, killed without a checkpoint after its start.
        gen.phase(0, 120)
        gen.orphans_and_garbage()
        produced.send(gen)
        procs.append(start_joiner(processes, env, checkpoint_s=3600, idle_ms=1500))
        output.wait("run 1 to emit 40 rows", lambda: len(output.rows) >= 40, procs[-1])
        procs[-1].send_signal(signal.SIGKILL)
        procs[-1].communicate(timeout=30)
        time.sleep(0.5)
        output.poll(1.0)
        emitted_by_run1 = len(output.rows)

        # Run 2: phase B; stopped while the tail of B still has open windows.
        gen.phase(120, 200, clicks_below=170, late_below=130)
        produced.send(gen)
        procs.append(start_joiner(processes, env, checkpoint_s=0.5, idle_ms=8000))
        expected = gen.expected_rows()
        settled = {k for k, v in expected.items() if v["event_time"] < Generator.when(120)}
        settled |= {k for k in expected if k[1] == POS}
        output.wait("run 2 to settle phase A", lambda: settled <= output.keys(), procs[-1])
        run2 = stop_joiner(procs[-1])
        output.poll(1.0)
        rows_after_run2 = len(output.rows)

        # Run 3: clicks into windows left open, clicks into closed windows, phase C.
        # The tail impressions of B were consumed by run 2 only; their positives (with
        # the features hashed then) can only come from the pending state run 3 restores.
        for i in range(170, 200):
            if i % 5 == 2:
                gen.in_window_click(i)
        for i in range(0, 120):
            if i % 9 == 2 and i % 5 != 0 and i % 7 != 1:
                gen.stream_late_click(i)
        gen.phase(200, 240)
        produced.send(gen)
        procs.append(start_joiner(processes, env, checkpoint_s=0.5, idle_ms=1500))
        expected = gen.expected_rows()
        output.wait("all samples", lambda: output.keys() >= expected.keys(), procs[-1])
        output.wait("all dead letters", lambda: len(output.dead) >= len(produced.dead), procs[-1])
        time.sleep(1.0)  # anything extra (a duplicate) would show up now
        counters = stop_joiner(procs[-1])
        output.poll(1.0)
    finally:
        processes.close()  # the processes fixture would too; the output is read after
        output.close()

    assert emitted_by_run1 >= 40 and len(output.rows) > rows_after_run2  # both paths exercised
    check_rows(output, expected)
    check_dead_letters(output, produced)
    # Counters survive restarts: run 3 reports totals over all phases.
    assert counters["late_clicks"] == gen.late_clicks
    assert counters["duplicate_impressions"] == gen.duplicates["impressions"]
    assert counters["duplicate_clicks"] == gen.duplicates["clicks"]
    assert (counters["orphan_clicks"], counters["malformed"]) == (3, 5)
    emitted = counters["positives"] + counters["negatives"] + counters["corrections"]
    assert emitted + counters["replay_suppressed"] == len(output.rows)
    assert run2["replay_suppressed"] == emitted_by_run1


def test_faust_engine_joins_exactly_in_one_run(
    kafka_bootstrap: str,
    kafka_conf: dict[str, object],
    project_topics: dict[str, str],
    unique: str,
    processes: ProcessGroups,
) -> None:
    """The faust engine gives the same samples and dead letters (no crash in this run)."""
    env = joiner_env(kafka_bootstrap, kafka_conf, project_topics, unique)
    gen, produced = Generator(), Produced(kafka_conf, project_topics)
    output = Output(kafka_conf, project_topics)
    gen.phase(0, 120)
    gen.orphans_and_garbage()
    produced.send(gen)
    expected = gen.expected_rows()
    proc = start_joiner(processes, env, checkpoint_s=0.5, idle_ms=1500, engine="faust")
    try:
        output.wait("all samples", lambda: output.keys() >= expected.keys(), proc, timeout=90)
        output.wait("all dead letters", lambda: len(output.dead) >= len(produced.dead), proc)
        time.sleep(1.0)
        counters = stop_joiner(proc)
        output.poll(1.0)
    finally:
        processes.close()
        output.close()
    check_rows(output, expected)
    check_dead_letters(output, produced)
    assert counters["late_clicks"] == gen.late_clicks
    assert counters["duplicate_impressions"] == gen.duplicates["impressions"]
    assert (counters["orphan_clicks"], counters["malformed"]) == (3, 5)


def test_repeated_kills_during_checkpoint_rounds_keep_the_output_exact(
    kafka_bootstrap: str,
    kafka_conf: dict[str, object],
    project_topics: dict[str, str],
    unique: str,
    processes: ProcessGroups,
) -> None:
    """Generator traffic in four phases; the joiner (checkpoint rounds every 0.2 s, so
    kills land between a cut and its manifest too) is SIGKILLed in each of the first
    three at a random moment, and the fourth run finishes. Every impression must have
    exactly one sample, labelled by its own clicks, and every malformed event exactly
    one dead letter."""
    import random

    from pipeline.ingest.generator import TrafficGenerator

    window = 2000
    gen = TrafficGenerator(
        seed=5,
        rate=3000.0,
        attribution_window_ms=window,
        mean_click_delay_ms=400,
        duplicate_clicks=40,
        malformed_events=8,
    )
    log = gen.events(16_000)
    labels = log.labels()
    expected = {
        key_hash(r["request_id"], r["item_id"]): int(y)
        for r, y in zip(log.impressions, labels.tolist(), strict=True)
    }
    slots = SlotConfig(("user_id", "item_id", "category", "device", "position"))
    env = {
        **joiner_env(kafka_bootstrap, kafka_conf, project_topics, unique),
        "PIPELINE_JOINER_SLOTS": ",".join(slots.slots),
        "PIPELINE_JOINER_WINDOW_MS": str(window),
        "PIPELINE_JOINER_NEGATIVE_RATE": "1.0",
        "PIPELINE_JOINER_LATE_CORRECTIONS": "false",
        "PIPELINE_JOINER_BATCH_SIZE": "256",
    }
    imps, clks = project_topics["events.impressions"], project_topics["events.clicks"]
    prod = Producer(dict(kafka_conf))
    dead: set[tuple[str, int, int]] = set()

    def remember(err: Any, msg: Any) -> None:
        assert err is None, err
        dead.add((msg.topic(), msg.partition(), msg.offset()))

    t0 = log.impressions[0]["event_time"]
    span = log.impressions[-1]["event_time"] - t0 + 1

    def phase_of(t: int) -> int:
        return min(3, max(0, (t - t0) * 4 // span))

    def send(phase: int) -> None:
        for r in log.impressions:
            if phase_of(r["event_time"]) == phase:
                value = avro.encode("Impression", r)
                prod.produce(imps, value, key=r["request_id"].encode())
        for r in log.clicks:
            if phase_of(r["event_time"]) == phase:
                prod.produce(clks, avro.encode("Click", r), key=r["request_id"].encode())
        for j, bad in enumerate(log.malformed):
            if j % 4 == phase:
                topic = imps if bad.topic == "events.impressions" else clks
                prod.produce(topic, bad.data, key=b"bad", on_delivery=remember)
        if phase == 3:  # far-future events on every partition close every real window
            far = t0 + span + 100 * window
            for p in range(PARTITIONS):
                rec = {"request_id": f"end-{p}", "user_id": "u", "item_id": "x", "event_time": far}
                prod.produce(imps, avro.encode("Impression", {**rec, "features": {}}), partition=p)
                rec["request_id"] = f"end-click-{p}"
                prod.produce(clks, avro.encode("Click", rec), partition=p)
        assert prod.flush(30) == 0

    output = Output(kafka_conf, project_topics, slots)
    rng = random.Random(7)
    procs: list[subprocess.Popen[str]] = []
    try:
        for phase in range(3):
            send(phase)
            seen = len(output.rows)
            procs.append(start_joiner(processes, env, checkpoint_s=0.2, idle_ms=600_000))
            output.wait(f"run {phase + 1} to emit", lambda s=seen: len(output.rows) > s, procs[-1])
            time.sleep(rng.uniform(0.0, 0.6))
            procs[-1].send_signal(signal.SIGKILL)
            procs[-1].communicate(timeout=30)
        send(3)
        procs.append(start_joiner(processes, env, checkpoint_s=0.2, idle_ms=600_000))
        output.wait(
            "every impression's sample",
            lambda: {r[0] for r in output.rows} >= expected.keys(),
            procs[-1],
            timeout=90,
        )
        output.wait("every dead letter", lambda: len(output.dead) >= len(dead), procs[-1])
        time.sleep(1.5)  # a duplicate would show up now
        counters = stop_joiner(procs[-1])
        output.poll(1.0)
    finally:
        processes.close()  # the processes fixture would too; the output is read after
        output.close()

    per_key = Counter(r[0] for r in output.rows)
    assert per_key == Counter(expected.keys())  # one sample per impression, no other
    assert {r[0]: int(r[2]) for r in output.rows} == expected  # labelled by its clicks
    dead_at = Counter(
        (d["source_topic"], d["source_partition"], d["source_offset"]) for d in output.dead
    )
    assert dead_at == Counter(dead)
    # counters are checkpointed: a replayed decision counts as suppressed, not again
    emitted = counters["positives"] + counters["negatives"]
    assert emitted + counters["replay_suppressed"] == len(output.rows)
    assert counters["late_clicks"] == log.late_clicks
    assert counters["duplicate_clicks"] == log.duplicate_clicks
