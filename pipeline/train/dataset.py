"""QueueDataset: training batches streamed from the ``samples`` topic by a consumer group.

A reader thread owns the consumer: it polls, decodes and validates each SampleBatch
message, cuts the rows into batches of ``batch_rows`` (:mod:`.batching`) and puts them
on a bounded queue (:mod:`.handoff`; a full queue blocks the reader: back-pressure).
Bad messages go to the dead-letter topic with their reason and still complete their
offset, in order. Offsets are committed only when the trainer asks
(:meth:`QueueDataset.commit`, performed by the reader thread, see :mod:`.commits`),
after it has trained and pushed the rows. The rebalance protocol that keeps every row
trained once is in ``docs/trainer-datasets.md``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.codec.errors import CodecError
from pipeline.codec.slots import SlotConfig
from pipeline.config import KafkaSettings
from pipeline.errors import ConfigError, PipelineError
from pipeline.ingest.dlq import DeadLetterWriter
from pipeline.kafka import consumer as make_consumer
from pipeline.train.batching import (
    Batcher,
    Chunk,
    Source,
    TopicPartition,
    TrainBatch,
    next_positions,
)
from pipeline.train.commits import CommitChannel
from pipeline.train.decoding import decode_for_training
from pipeline.train.handoff import BatchQueue, QueueClosed

__all__ = [
    "CONSUMER_DEFAULTS",
    "DatasetStats",
    "QueueDataset",
    "RevokeHook",
    "Source",
    "TrainBatch",
    "next_positions",
]

log = logging.getLogger(__name__)

#: Called with the revoked ``(topic, partition)`` list; returns only once everything the
#: trainer took from them is trained, pushed and committed (see the docs).
RevokeHook = Callable[[list[TopicPartition]], None]

#: Consumer settings sized for SampleBatch messages (0.1-4 MB: 1024 Criteo-like rows
#: are about 0.4 MB). Overridable with ``consumer_overrides``.
CONSUMER_DEFAULTS: dict[str, Any] = {
    # Let the broker gather about a megabyte per fetch (a few messages) but answer
    # within 100 ms when the topic is quiet, so a slow stream still trains promptly.
    "fetch.min.bytes": 1 << 20,
    "fetch.wait.max.ms": 100,
    # One partition may return up to 16 MB (the producer's message.max.bytes), a
    # whole fetch 64 MB: several partitions' batches per round trip.
    "max.partition.fetch.bytes": 16 << 20,
    "fetch.max.bytes": 64 << 20,
    # librdkafka's prefetch (on top of our queue): 64 MB keeps the next fetch in
    # flight while the reader decodes; it is discarded, not trained, on revocation.
    "queued.max.messages.kbytes": 64 << 10,
    # Eager assignors: the embedded broker cannot run cooperative-sticky.
    "partition.assignment.strategy": "range,roundrobin",
}
_POLL_MESSAGES = 64
_POLL_S = 0.02  # consume() returns after this when fewer messages came: commit latency
_SLICE_S = 0.01  # while blocked (full queue, revocation hook), commits are served this often


@dataclass
class DatasetStats:
    """Counters of a QueueDataset (a snapshot).

    ``queue_full_s`` large: reading is faster than training (the trainer is the
    bottleneck). ``get_wait_s`` large: the trainer waits for data (IO is).
    """

    messages: int = 0  # messages read, decoded or dead-lettered
    rows: int = 0  # rows decoded
    bytes: int = 0  # message values read
    batches: int = 0  # TrainBatches handed out by get()
    dead_letters: Counter[str] = field(default_factory=Counter)  # by reason
    dropped_messages: int = 0  # taken back on revocation before training (re-read later)
    dropped_rows: int = 0
    stale_messages: int = 0  # arrived for a partition no longer assigned (re-read later)
    revocations: int = 0
    lost: int = 0
    commits: int = 0  # commit round trips to the broker
    refused_commits: int = 0  # partitions not owned any more when the commit was performed
    poll_s: float = 0.0  # reader time inside consume()
    decode_s: float = 0.0  # reader time decoding, validating, batching, dead-lettering
    queue_full_s: float = 0.0  # reader blocked on a full queue
    get_wait_s: float = 0.0  # trainer blocked in get() on an empty queue

    @property
    def dead_letters_total(self) -> int:
        """Dead-lettered messages, all reasons."""
        return sum(self.dead_letters.values())


class QueueDataset:
    """Training batches from ``topic`` read by consumer group ``group``.

    Nothing touches Kafka until :meth:`start`. One trainer thread calls :meth:`get`,
    trains, pushes, then :meth:`commit` s ``next_positions(batch.completes)``.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str,
        group: str,
        expected: SlotConfig,
        batch_rows: int,
        *,
        dlq: DeadLetterWriter | None,
        queue_batches: int = 16,
        consumer_overrides: Mapping[str, Any] | None = None,
        on_revoke: RevokeHook | None = None,
        linger_s: float = 0.05,
    ) -> None:
        if not topic or not group:
            raise ConfigError(f"topic and group must be non-empty (got {topic!r}, {group!r})")
        if not linger_s >= 0:
            raise ConfigError(f"linger_s must be >= 0 seconds, got {linger_s!r}")
        overrides = dict(consumer_overrides or {})
        for key in ("group.id", "enable.auto.commit"):
            if key in overrides:
                raise ConfigError(
                    f"consumer_overrides: {key} is set by the dataset (the group is an "
                    "argument; offsets are committed only after training): remove it"
                )
        self.topic, self.group, self.expected = topic, group, expected
        self._kafka = kafka
        self._conf = {**CONSUMER_DEFAULTS, **overrides}
        self._batcher = Batcher(batch_rows)
        self._queue = BatchQueue(queue_batches)
        self._commits = CommitChannel()
        self._dlq = dlq
        self._hook = on_revoke
        self._linger_s = float(linger_s)
        self._consumer: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._hold = threading.Event()
        self._paused: set[TopicPartition] = set()  # reader thread only
        self._closing = False
        self._lock = threading.Lock()  # stats and the assignment snapshot
        self._assigned: set[TopicPartition] = set()  # changed by the reader thread only
        self._committed: dict[TopicPartition, int] = {}
        self._stats = DatasetStats()
        self._last_message = time.monotonic()
        self._pending_since = 0.0

    # -- trainer side -------------------------------------------------------------

    def start(self) -> None:
        """Subscribe and start the reader thread."""
        if self._consumer is not None:
            raise PipelineError("the dataset was already started")
        self._consumer = make_consumer(self._kafka, self.group, **self._conf)
        self._consumer.subscribe(
            [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._lost
        )
        self._last_message = time.monotonic()
        self._thread = threading.Thread(
            target=self._read, name=f"dataset-reader[{self.topic}]", daemon=True
        )
        self._thread.start()

    def set_batch_rows(self, rows: int) -> None:
        """Cut the next batches at ``rows`` rows (the trainer's step schedule); batches
        already queued keep their size."""
        self._batcher.resize(rows)

    def get(self, timeout: float) -> TrainBatch | None:
        """The next batch, or None after ``timeout`` seconds without one."""
        began = time.perf_counter()
        batch = self._queue.get(timeout)
        with self._lock:
            self._stats.get_wait_s += time.perf_counter() - began
            self._stats.batches += batch is not None
        return batch

    def commit(
        self, positions: Mapping[TopicPartition, int], *, wait: bool = True, timeout: float = 30.0
    ) -> dict[TopicPartition, int]:
        """Commit the next offset to read per ``(topic, partition)``.

        Pass ``next_positions(completes)`` of batches that are trained and pushed. The
        reader thread performs it (dead letters flushed first) within about 20 ms;
        with ``wait`` this returns what was committed for these partitions once the
        broker confirmed (PipelineError if it refused). Without, it returns {} at
        once and a refusal is only logged (a later commit covers those offsets);
        queued requests are still performed before a revocation completes and by
        :meth:`close`. Partitions this consumer no longer owns are left out (their new
        owner resumes from the last commit; counted in ``refused_commits``), as are
        positions not ahead of the last commit.
        """
        if self._consumer is None:
            raise PipelineError("commit() before start()")
        ticket = self._commits.request(positions)
        if not wait:
            return {}
        if not ticket.done.wait(timeout):
            raise PipelineError(f"commit of {ticket.positions} not performed within {timeout:g} s")
        if ticket.error is not None:
            raise PipelineError(f"commit of {ticket.positions} failed: {ticket.error}")
        return ticket.committed

    def unfinished(
        self, partitions: Collection[TopicPartition] | None = None
    ) -> tuple[Source, ...]:
        """Messages whose first rows get() handed out but whose last rows it has not yet.

        A revocation hook drains :meth:`get` until this is empty for the revoked
        partitions, so every message it started is finished before it commits.
        """
        return self._queue.unfinished(partitions)

    def hold(self, on: bool) -> None:
        """Stop (``True``) or resume (``False``) taking new messages.

        While held, the reader pauses its partitions and hands out the open partial
        batch at once, so every message :meth:`get` started finishes and
        :meth:`unfinished` becomes empty even on a stream that is never idle: the
        clean point a snapshot cut waits for. Commits and rebalances go on.
        """
        if on:
            self._hold.set()
        else:
            self._hold.clear()

    def assignment(self) -> list[TopicPartition]:
        """The partitions this consumer owns now."""
        with self._lock:
            return sorted(self._assigned)

    @property
    def generation(self) -> int:
        """Revocations so far (batches carry the generation they were read in)."""
        return self._queue.generation

    @property
    def stats(self) -> DatasetStats:
        """A snapshot of the counters."""
        with self._lock:
            return replace(self._stats, dead_letters=Counter(self._stats.dead_letters))

    def idle_for(self) -> float:
        """Seconds since the reader last received a message (or since start)."""
        return time.monotonic() - self._last_message

    def close(self) -> None:
        """Perform pending commits, stop the reader and leave the group.

        The revocation hook is not called for this last revocation: commit first.
        """
        if self._closing:
            return
        self._closing = True
        self._stop.set()
        self._queue.close()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._consumer is not None:
            try:
                self._serve_commits()  # the reader is gone: our turn
            finally:
                self._commits.close("the dataset is closed")
                self._consumer.close()
        if self._dlq is not None:
            self._dlq.flush()

    def __enter__(self) -> QueueDataset:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reader thread ------------------------------------------------------------

    def _read(self) -> None:
        try:
            while not self._stop.is_set():
                began = time.perf_counter()
                msgs = self._consumer.consume(num_messages=_POLL_MESSAGES, timeout=_POLL_S)
                polled = time.perf_counter()
                waited = 0.0
                for msg in msgs:
                    waited += self._handle(msg)
                held = self._apply_hold()
                pending = self._batcher.pending_rows
                lingered = time.monotonic() - self._pending_since >= self._linger_s
                if pending and (held or lingered):
                    waited += self._put(self._batcher.flush())
                self._serve_commits()
                with self._lock:
                    self._stats.poll_s += polled - began
                    self._stats.decode_s += time.perf_counter() - polled - waited
                    self._stats.queue_full_s += waited
        except QueueClosed:
            pass
        except BaseException as exc:
            log.exception("dataset reader of %s failed", self.topic)
            self._commits.close(f"the dataset reader failed: {exc}")
            self._queue.fail(exc)

    def _apply_hold(self) -> bool:
        """Pause or resume the owned partitions as :meth:`hold` asks; True while held."""
        from confluent_kafka import TopicPartition as KafkaTP

        held = self._hold.is_set()
        want = set(self._assigned) if held else set()
        pause, resume = want - self._paused, self._paused - want
        if pause:
            self._consumer.pause([KafkaTP(t, p) for t, p in sorted(pause)])
        if resume:
            self._consumer.resume([KafkaTP(t, p) for t, p in sorted(resume)])
        self._paused = want
        return held

    def _handle(self, msg: Any) -> float:
        """Decode one message into the batcher; return seconds blocked on the queue."""
        from confluent_kafka import KafkaError

        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                return 0.0
            if err.fatal() or err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise PipelineError(f"consuming {self.topic}: {err}")
            log.warning("consuming %s: %s", self.topic, err)
            return 0.0
        key = (msg.topic(), msg.partition())
        if key not in self._assigned:  # fetched before a revocation: the next owner reads it
            with self._lock:
                self._stats.stale_messages += 1
            return 0.0
        self._last_message = time.monotonic()
        source: Source = (key[0], key[1], msg.offset())
        value = msg.value() or b""
        was_empty = self._batcher.pending_rows == 0
        try:
            batch = decode_for_training(value, self.expected)
        except Exception as exc:  # no message may stop the partition: dead-letter it
            if not isinstance(exc, CodecError):
                log.exception("decoding %s[%d]@%d failed unexpectedly", *source)
                exc = CodecError("decode_failed", f"{type(exc).__name__}: {exc}")
            self._dead_letter(msg, exc)
            chunks = self._batcher.add_dead(source)
            rows = 0
        else:
            chunks = self._batcher.add(source, batch)
            rows = batch.num_rows
        if was_empty or chunks:
            self._pending_since = time.monotonic()
        with self._lock:
            self._stats.messages += 1
            self._stats.rows += rows
            self._stats.bytes += len(value)
        return self._put(chunks)

    def _dead_letter(self, msg: Any, exc: CodecError) -> None:
        where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
        if self._dlq is None:
            log.warning("skipping %s (no dead-letter writer): %s", where, exc)
        else:
            self._dlq.send_error(msg, exc)
        with self._lock:
            self._stats.dead_letters[exc.reason] += 1

    def _put(self, chunks: list[Chunk]) -> float:
        """Queue ``chunks``, serving commits while the queue is full (the trainer may be
        waiting for one before it takes the next batch)."""
        waited = 0.0
        for chunk in chunks:
            while True:
                try:
                    waited += self._queue.put(chunk, timeout=_SLICE_S)
                    break
                except TimeoutError:
                    waited += _SLICE_S
                    self._serve_commits()
        return waited

    def _serve_commits(self) -> None:
        """Perform the queued commit requests; a failure goes to their waiters only."""
        try:
            self._commits.serve(self._perform_commit)
        except Exception as exc:  # the broker refused: the next commit covers these offsets
            log.warning("%s: commit failed: %s", self.group, exc)

    def _perform_commit(self, merged: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Commit ``merged`` for owned partitions ahead of the last commit (reader thread)."""
        from confluent_kafka import KafkaException
        from confluent_kafka import TopicPartition as KafkaTP

        refused = sorted(tp for tp in merged if tp not in self._assigned)
        if refused:
            log.warning("not committing %s: no longer assigned to this consumer", refused)
        todo = {
            tp: off
            for tp, off in merged.items()
            if tp in self._assigned and off > self._committed.get(tp, -1)
        }
        if todo:
            if self._dlq is not None:
                self._dlq.flush()
            offsets = [KafkaTP(t, p, off) for (t, p), off in sorted(todo.items())]
            try:
                result = self._consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                raise PipelineError(f"committing {sorted(todo.items())}: {exc}") from None
            failed = [tp for tp in result or () if tp.error is not None]
            if failed:
                tp = failed[0]
                raise PipelineError(f"committing {tp.topic}[{tp.partition}]: {tp.error}")
            self._committed.update(todo)
        with self._lock:
            self._stats.refused_commits += len(refused)
            self._stats.commits += bool(todo)
        return todo

    # -- rebalance callbacks (reader thread inside consume(), or close()) -----------

    def _on_assign(self, _consumer: Any, partitions: list[Any]) -> None:
        got = {(tp.topic, tp.partition) for tp in partitions}
        with self._lock:
            self._assigned |= got
        for tp in got:  # another member may have committed past what we remember
            self._committed.pop(tp, None)
        self._paused -= got  # a new assignment starts unpaused; _apply_hold pauses it again
        log.info("%s: assigned %s", self.group, sorted(got))

    def _on_revoke(self, _consumer: Any, partitions: list[Any]) -> None:
        revoked = sorted({(tp.topic, tp.partition) for tp in partitions})
        result = self._queue.revoke(revoked, self._batcher)
        with self._lock:
            self._stats.revocations += 1
            self._stats.dropped_messages += result.dropped_messages
            self._stats.dropped_rows += result.dropped_rows
        log.info(
            "%s: revoked %s; took back %d messages (%d rows), %d started ones to finish",
            self.group,
            revoked,
            result.dropped_messages,
            result.dropped_rows,
            len(result.unfinished),
        )
        try:
            if self._hook is not None and not self._closing:
                self._run_hook(revoked)
        finally:
            self._serve_commits()  # what the hook asked for, last
            with self._lock:
                self._assigned -= set(revoked)
            self._paused -= set(revoked)

    def _run_hook(self, revoked: list[TopicPartition]) -> None:
        """Run the user's hook in a helper thread, serving its commits meanwhile."""
        assert self._hook is not None
        hook, errors = self._hook, list[BaseException]()

        def call() -> None:
            try:
                hook(revoked)
            except BaseException as exc:
                errors.append(exc)

        helper = threading.Thread(target=call, name="dataset-revoke-hook", daemon=True)
        helper.start()
        while helper.is_alive():
            self._serve_commits()
            helper.join(_SLICE_S)
        if errors:
            raise PipelineError(f"the revocation hook failed: {errors[0]}") from errors[0]

    def _lost(self, _consumer: Any, partitions: list[Any]) -> None:
        lost = sorted({(tp.topic, tp.partition) for tp in partitions})
        log.warning("%s: lost %s (session expired); no commit possible", self.group, lost)
        with self._lock:
            self._assigned -= set(lost)
        self._paused -= set(lost)
        result = self._queue.revoke(lost, self._batcher, lost=True)
        with self._lock:
            self._stats.lost += 1
            self._stats.dropped_messages += result.dropped_messages
            self._stats.dropped_rows += result.dropped_rows
