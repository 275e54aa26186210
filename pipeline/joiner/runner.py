"""The confluent-kafka engine of the joiner: consume, join, produce, checkpoint.

One consumer in group ``<prefix><app_id>`` reads both input topics with the range
assignor, which hands out partition ``p`` of impressions and clicks together. Each
poll (up to ``poll_size`` messages) is joined in bulk by :class:`JoinEngine`.

Checkpoints are incremental and do not stop consumption: every
``checkpoint_interval_s`` a *round* cuts each partition's state at that point (its
changed rows as a delta, the input offsets it covers), queues the deltas on the
producer and returns to consuming. The round completes in the background: once
every output produced before the cut and every delta chunk is delivered, it writes
each partition's manifest (the delta chain and the output positions at the cut), and
once those are delivered it commits the offsets (for lag only). A restarted joiner
loads the newest complete checkpoint, reads what it emitted after it (``samples``
and ``samples.dlq`` from the recorded positions) so those are not emitted twice,
and replays its input from the checkpoint's offsets.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import KafkaSettings
from pipeline.errors import PipelineError
from pipeline.joiner.checkpoint import (
    CHUNK_BYTES,
    ChangelogStore,
    ensure_compacted_topic,
    recover_outputs,
)
from pipeline.joiner.engine import JoinEngine, OutRecord, Topics
from pipeline.joiner.logic import Counters, JoinConfig
from pipeline.joiner.output import SampleBatcher
from pipeline.joiner.settings import JoinerSettings
from pipeline.kafka import consumer, producer

__all__ = ["JoinRunner", "join_config", "topics_for"]

log = logging.getLogger(__name__)


def join_config(settings: JoinerSettings) -> JoinConfig:
    """The pure join configuration of ``settings``."""
    return JoinConfig(
        slots=settings.slot_config(),
        window_ms=settings.window_ms,
        lateness_ms=settings.lateness_ms,
        idle_ms=settings.idle_ms,
        retention_ms=settings.retention_ms,
        negative_rate=settings.negative_rate,
        late_corrections=settings.late_corrections,
        positives_at_close=settings.positives == "close",
    )


def topics_for(settings: JoinerSettings, prefix: str) -> Topics:
    """Physical topic names under ``prefix``."""
    return Topics(
        impressions=prefix + settings.impressions_topic,
        clicks=prefix + settings.clicks_topic,
        samples=prefix + settings.samples_topic,
        dlq=prefix + settings.dlq_topic,
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


POLL_SIZE = 10_000  # messages per poll: the bulk decode amortises its per-call cost


@dataclass
class _Round:
    """One checkpoint round: cut, then completed as deliveries come back."""

    parts: list[int]
    targets: dict[tuple[str, int], int]  # outputs produced before the cut, per partition
    positions: dict[tuple[str, int], int]  # output positions at the cut, once delivered
    chains: dict[int, list[int]]  # per input partition: the deltas its manifest names
    offsets: list[Any]  # TopicPartitions to commit once durable
    outstanding: int = 0  # changelog messages not yet delivered
    manifests_left: int = -1  # -1: not written yet
    started: float = field(default_factory=time.monotonic)


class JoinRunner:
    """Runs the join until ``stop`` is set; at-least-once with replay dedup (docs/joiner.md)."""

    def __init__(
        self,
        settings: JoinerSettings,
        kafka: KafkaSettings,
        prefix: str = "",
        clock: Callable[[], int] = _now_ms,
    ) -> None:
        self.settings = settings
        self.kafka = kafka
        self.topics = topics_for(settings, prefix)
        self.group_id = prefix + settings.app_id
        self.changelog_topic = f"{prefix}{settings.app_id}.changelog"
        self.clock = clock
        self.poll_size = POLL_SIZE
        self.engine: JoinEngine | None = None
        self._out_pos: dict[tuple[str, int], int] = {}
        self._produced: dict[tuple[str, int], int] = {}  # output messages, per partition
        self._delivered: dict[tuple[str, int], int] = {}
        self._rounds: list[_Round] = []
        self._errors: list[str] = []
        self._callback_error: Exception | None = None
        self.round_ms: list[float] = []  # how long each round held up consumption
        self.round_cpu_ms: list[float] = []  # of that, CPU time of this thread
        self.completed_ms: list[float] = []  # cut to durable manifest, per round

    # -- setup -------------------------------------------------------------------------

    def _partition_count(self, cons: Any, topic: str) -> int:
        meta = cons.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise PipelineError(f"topic {topic} does not exist (run `pipeline topics apply`)")
        return len(meta.partitions)

    def _setup(self, cons: Any) -> ChangelogStore:
        from confluent_kafka import TopicPartition

        t = self.topics
        n_imp, n_clk = (
            self._partition_count(cons, t.impressions),
            self._partition_count(cons, t.clicks),
        )
        if n_imp != n_clk:
            raise PipelineError(
                f"{t.impressions} has {n_imp} partitions and {t.clicks} {n_clk}: the join needs "
                "them co-partitioned (same count, both keyed by request id)"
            )
        n_samples = self._partition_count(cons, t.samples)
        n_dlq = self._partition_count(cons, t.dlq)
        batcher = SampleBatcher(
            self.settings.slot_config(),
            n_samples,
            self.settings.batch_size,
            self.settings.linger_ms,
            self.settings.negative_rate,
        )
        self.engine = JoinEngine(join_config(self.settings), t, batcher, n_dlq)
        # Lower bounds of where this process's output can land (ListOffsets may be low).
        for topic, count in ((t.samples, n_samples), (t.dlq, n_dlq)):
            for q in range(count):
                _, high = cons.get_watermark_offsets(TopicPartition(topic, q), timeout=10)
                self._out_pos[(topic, q)] = max(0, high)
        parts = ensure_compacted_topic(self.kafka, self.changelog_topic, n_imp)
        return ChangelogStore(self.kafka, self.changelog_topic, parts)

    # -- output ------------------------------------------------------------------------

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err}")
            return
        key = (msg.topic(), msg.partition())
        self._out_pos[key] = max(self._out_pos.get(key, 0), msg.offset() + 1)
        done = self._delivered[key] = self._delivered.get(key, 0) + 1
        for r in self._rounds:
            if r.targets.get(key) == done:
                r.positions[key] = msg.offset() + 1

    def _on_changelog(self, r: _Round) -> Callable[[Any, Any], None]:
        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                self._errors.append(f"{msg.topic()}: {err}")
            r.outstanding -= 1

        return delivered

    def _on_manifest(self, r: _Round) -> Callable[[Any, Any], None]:
        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                self._errors.append(f"{msg.topic()}: {err}")
            r.manifests_left -= 1

        return delivered

    def _produce(self, prod: Any, records: Iterable[OutRecord]) -> None:
        for rec in records:
            kwargs: dict[str, Any] = {"key": rec.key, "headers": rec.headers or None}
            if rec.partition is not None:
                kwargs["partition"] = rec.partition
                tp = (rec.topic, rec.partition)
                self._produced[tp] = self._produced.get(tp, 0) + 1
            while True:
                try:
                    prod.produce(rec.topic, rec.value, on_delivery=self._on_delivery, **kwargs)
                    break
                except BufferError:
                    prod.poll(0.1)
        prod.poll(0)

    def _flush(self, prod: Any) -> None:
        if prod.flush(60) or self._errors:
            raise PipelineError(f"producing joiner output failed: {self._errors[:3] or 'timeout'}")

    def _outputs(self, positions: dict[tuple[str, int], int]) -> dict[str, dict[str, int]]:
        doc: dict[str, dict[str, int]] = {"samples": {}, "dlq": {}}
        for (topic, q), pos in positions.items():
            doc["samples" if topic == self.topics.samples else "dlq"][str(q)] = pos
        return doc

    def _start_round(
        self, prod: Any, store: ChangelogStore, parts: Iterable[int], full: bool = False
    ) -> None:
        """Cut ``parts``: drain their batches, queue their deltas; the rest is async."""
        from confluent_kafka import TopicPartition

        begin, begin_cpu = time.perf_counter(), time.thread_time()
        engine = self._engine
        parts = list(parts)
        for p in parts:
            self._produce(prod, engine.drain(p))
        targets = dict(self._produced)
        positions = {
            tp: self._out_pos.get(tp, 0)
            for tp, n in targets.items()
            if self._delivered.get(tp, 0) >= n
        }
        for tp, pos in self._out_pos.items():  # partitions this process never wrote to
            if tp not in targets:
                positions[tp] = pos
        r = _Round(parts, targets, positions, {}, [])
        self._rounds.append(r)
        on_chunk = self._on_changelog(r)
        for p in parts:
            seq = store.take_seq(p)
            blob = engine.delta(p, seq, full=full)
            oldest = engine.oldest_needed(p, seq)
            r.outstanding += max(1, -(-len(blob) // CHUNK_BYTES)) + 1
            r.chains[p] = store.write_delta(prod, p, seq, blob, oldest, on_chunk)
            r.offsets += [
                TopicPartition(
                    self.topics.impressions if s == "impressions" else self.topics.clicks, p, o
                )
                for s, o in engine.positions[p].items()
            ]
        prod.poll(0)
        self.round_ms.append(1000 * (time.perf_counter() - begin))
        self.round_cpu_ms.append(1000 * (time.thread_time() - begin_cpu))

    def _advance_rounds(self, prod: Any, cons: Any, store: ChangelogStore) -> None:
        """Complete rounds in order: manifests once their inputs are durable, then commit."""
        while self._rounds:
            r = self._rounds[0]
            if r.manifests_left < 0:
                if r.outstanding > 0 or len(r.positions) < len(r.targets):
                    return
                outputs = self._outputs(r.positions)
                r.manifests_left = len(r.parts)
                for p in r.parts:
                    store.write_manifest(prod, p, r.chains[p], outputs, self._on_manifest(r))
                prod.poll(0)
            if r.manifests_left > 0:
                return
            self._rounds.pop(0)
            self.completed_ms.append(1000 * (time.monotonic() - r.started))
            for p in r.parts:
                store.forget(prod, p, r.chains[p])
                if p in self._engine.joiners:
                    self._engine.forget_dead_letters_before(p)
            if r.offsets:
                try:
                    cons.commit(offsets=r.offsets, asynchronous=True)
                except Exception as exc:  # the checkpoint is the source of truth
                    log.warning("committing offsets failed (checkpoint is written): %s", exc)

    def _checkpoint(
        self,
        prod: Any,
        cons: Any,
        store: ChangelogStore,
        parts: Iterable[int],
        full: bool = False,
        timeout_s: float = 60.0,
    ) -> None:
        """A round for ``parts`` and every round before it, completed before returning."""
        self._start_round(prod, store, parts, full)
        deadline = time.monotonic() + timeout_s
        while self._rounds:
            prod.poll(0.05)
            if self._errors:
                raise PipelineError(f"producing joiner output failed: {self._errors[:3]}")
            self._advance_rounds(prod, cons, store)
            if time.monotonic() > deadline:
                raise PipelineError(f"a checkpoint was not delivered within {timeout_s}s")

    @property
    def _engine(self) -> JoinEngine:
        if self.engine is None:
            raise RuntimeError("the runner is not set up")
        return self.engine

    # -- assignment ----------------------------------------------------------------------

    def _start_offsets(self, cons: Any, p: int) -> dict[str, int]:
        from confluent_kafka import TopicPartition

        out = {}
        for stream, topic in (
            ("impressions", self.topics.impressions),
            ("clicks", self.topics.clicks),
        ):
            low, high = cons.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            out[stream] = max(0, low if self.settings.start_from == "earliest" else high)
        return out

    def _restore(self, prod: Any, cons: Any, store: ChangelogStore, parts: list[int]) -> None:
        """Take over ``parts``: load checkpoints, note output emitted after them."""
        engine, now = self._engine, self.clock()
        found = store.load(parts)
        fresh = [p for p in parts if not found[p].blobs]
        for p in fresh:
            engine.assign(p, None, now)
            engine.positions[p] = self._start_offsets(cons, p)
        if fresh:
            # a base to dedup against after a crash, before any output
            self._checkpoint(prod, cons, store, fresh, full=True)
            log.info("partitions %s: no checkpoint, starting fresh", fresh)
        starts: dict[int, dict[tuple[str, int], int]] = {}
        for p in parts:
            restored = found[p]
            if not restored.blobs:
                continue
            engine.assign(p, restored.blobs, now)
            starts[p] = {
                (self.topics.samples if kind == "samples" else self.topics.dlq, int(q)): pos
                for kind, positions in restored.outputs.items()
                for q, pos in positions.items()
            }
            for tp, pos in starts[p].items():  # never record positions below a restored one
                self._out_pos[tp] = max(self._out_pos.get(tp, 0), pos)
        if starts:
            rows, dead = recover_outputs(self.kafka, engine, starts)
            log.info("restored %s; %d rows, %d dead letters after them", sorted(starts), rows, dead)

    def _mark_lagging(self, cons: Any, now: int) -> None:
        """Streams with unread messages (or no fetch answer yet) must not count as idle."""
        from confluent_kafka import TopicPartition

        engine = self._engine
        for p, positions in engine.positions.items():
            for stream, topic in (
                ("impressions", self.topics.impressions),
                ("clicks", self.topics.clicks),
            ):
                _, high = cons.get_watermark_offsets(TopicPartition(topic, p), cached=True)
                if high < 0 or positions.get(stream, 0) < high:
                    engine.mark_busy(p, topic, now)

    # -- main loop ------------------------------------------------------------------------

    def _handle(self, prod: Any, msgs: list[Any]) -> None:
        """Join one poll's messages in bulk and produce what it decided."""
        if not msgs:
            return
        engine = self._engine
        good = [m for m in msgs if m.error() is None]
        if len(good) < len(msgs):
            for msg in msgs:
                err = msg.error()
                if err is not None and err.fatal():
                    raise PipelineError(f"consumer failed: {err}")
                if err is not None:
                    log.warning("consumer: %s", err)
        parts = [m.partition() for m in good]
        if not engine.joiners.keys() >= set(parts):
            good = [m for m, p in zip(good, parts, strict=True) if p in engine.joiners]
            parts = [m.partition() for m in good]
        if not good:
            return
        out = engine.handle_many(
            [m.topic() for m in good],
            parts,
            [m.value() or b"" for m in good],
            self.clock(),
            lambda i: int(good[i].offset()),
            lambda i: good[i].key(),
        )
        self._produce(prod, out)

    def run(self, stop: threading.Event | None = None) -> Counters:
        """Join until ``stop`` is set, then checkpoint and return the totals."""
        from confluent_kafka import OFFSET_BEGINNING, KafkaException

        stop = stop or threading.Event()
        # What exists now (modules, torch, config) lives as long as the process: keep it
        # out of the collector's full passes, which otherwise stall a poll now and then.
        gc.freeze()
        cons = consumer(self.kafka, self.group_id, **{"partition.assignment.strategy": "range"})
        prod = producer(self.kafka)
        store = self._setup(cons)
        engine = self._engine
        topics = self.topics

        def on_assign(c: Any, tps: list[Any]) -> None:
            try:
                by_topic = {
                    t: {tp.partition for tp in tps if tp.topic == t}
                    for t in (topics.impressions, topics.clicks)
                }
                if by_topic[topics.impressions] != by_topic[topics.clicks]:
                    raise PipelineError(
                        f"assigned impressions {sorted(by_topic[topics.impressions])} but "
                        f"clicks {sorted(by_topic[topics.clicks])}: the join needs partition p "
                        "of both topics in one member (range assignor, equal partition counts)"
                    )
                self._restore(prod, c, store, sorted({tp.partition for tp in tps}))
                for tp in tps:
                    stream = "impressions" if tp.topic == topics.impressions else "clicks"
                    tp.offset = engine.positions[tp.partition].get(stream, OFFSET_BEGINNING)
                c.assign(tps)
            except Exception as exc:  # raised again from the main loop
                self._callback_error = self._callback_error or exc

        def on_revoke(c: Any, tps: list[Any]) -> None:
            parts = sorted({tp.partition for tp in tps} & engine.joiners.keys())
            try:
                if not (self._errors or self._callback_error):
                    self._checkpoint(prod, c, store, parts)
            except Exception as exc:
                self._callback_error = self._callback_error or exc
            for p in parts:
                engine.revoke(p)

        def on_lost(c: Any, tps: list[Any]) -> None:
            for p in {tp.partition for tp in tps}:
                engine.revoke(p)

        cons.subscribe(
            [topics.impressions, topics.clicks],
            on_assign=on_assign,
            on_revoke=on_revoke,
            on_lost=on_lost,
        )
        interval_ms = int(self.settings.checkpoint_interval_s * 1000)
        last_checkpoint = self.clock()
        due: list[int] = []  # partitions to cut in this checkpoint interval
        try:
            while not stop.is_set():
                msgs = cons.consume(num_messages=self.poll_size, timeout=0.1)
                if self._callback_error is not None:
                    raise self._callback_error
                self._handle(prod, msgs)
                now = self.clock()
                self._mark_lagging(cons, now)
                self._produce(prod, engine.tick(now))
                if self._errors:
                    self._flush(prod)
                self._advance_rounds(prod, cons, store)
                if not due and now - last_checkpoint >= interval_ms and engine.joiners:
                    due = sorted(engine.joiners)
                    last_checkpoint = now
                due = [p for p in due if p in engine.joiners]
                if due:  # one partition per poll: each cut stays short
                    self._start_round(prod, store, [due.pop(0)])
                    log.info(
                        "checkpoint cut in %.1f ms (%.1f ms CPU; %d rounds in flight): %s",
                        self.round_ms[-1],
                        self.round_cpu_ms[-1],
                        len(self._rounds),
                        engine.stats(),
                    )
            counters = engine.counters()
            if engine.joiners:
                self._checkpoint(prod, cons, store, list(engine.joiners))
            for p in list(engine.joiners):
                engine.revoke(p)  # so leaving the group does not checkpoint again
            return counters
        except KafkaException as exc:
            raise PipelineError(f"joiner: {exc}") from None
        finally:
            cons.close()
