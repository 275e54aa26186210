"""The demo's data: paced producers of events (for the joiner) or of sample batches.

A feed is a thread that produces a time-ordered plan at wall-clock pace and counts
what it produced. Three plans:

* :class:`EventFeed`: the synthetic generator's impressions and clicks, generated and
  encoded block by block as they become due, each sent to ``events.impressions`` /
  ``events.clicks`` when the wall clock reaches its event time (the generator starts
  at "now"), for ``pipeline join`` to label;
* :class:`SampleFeed` over the generator's sample batches (labels already known,
  no joiner), or over a dataset's batches with their event times restamped to the
  wall clock when sent, so freshness measures the pipeline, not the data's age.

``expected_samples`` is what the trainers must end up training: one sample per
impression (the demo's joiner keeps every negative) or per produced row.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from pipeline.codec.samplebatch import SampleBatch

if TYPE_CHECKING:
    from pipeline.ingest.eventbytes import EncodedEvents
    from pipeline.ingest.generator import TrafficGenerator

__all__ = ["EventFeed", "Feed", "SampleFeed"]

#: Shortest pause between two sends of a paced feed. Each wake-up costs about 60 us of
#: CPU on the demo box, so waking per event (or every 2 ms) would cost more than the
#: events; events wait at most this long, nothing against freshness in seconds.
PACE_S = 0.01


class Feed(threading.Thread):
    """A paced producer thread; ``error`` holds why it failed (checked by the demo)."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.error: str | None = None
        self._halt = threading.Event()

    def stop(self) -> None:
        """Stop producing; what was produced is flushed."""
        self._halt.set()

    @property
    def expected_samples(self) -> int:
        """Samples the trainers must train once everything produced is processed."""
        raise NotImplementedError

    def _pause(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when stopped meanwhile.

        Short pauses are a plain sleep: ``Event.wait`` costs about twice the CPU per
        wake-up (measured here: 140 us against 60 us), and a stop waits at most that long.
        """
        if seconds <= PACE_S:
            time.sleep(max(0.0, seconds))
            return self._halt.is_set()
        return self._halt.wait(seconds)


class SampleFeed(Feed):
    """Sample batches to ``topic`` at ``rate`` rows/s, round-robin over its partitions.

    With ``restamp`` every row's event time becomes the wall clock when its batch is
    sent (dataset replay); otherwise the batches keep theirs (the generator's are
    already on the wall clock).
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        batches: Iterable[SampleBatch],
        rate: float,
        *,
        restamp: bool,
    ) -> None:
        super().__init__("demo-samples")
        self.bootstrap, self.topic, self.rate, self.restamp = bootstrap, topic, rate, restamp
        self._batches = batches
        self.produced = 0

    @property
    def expected_samples(self) -> int:
        return self.produced

    def run(self) -> None:
        from confluent_kafka import Producer

        from pipeline.codec.samplebatch import encode_batch

        try:
            producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
            partitions = len(
                producer.list_topics(self.topic, timeout=10).topics[self.topic].partitions
            )
            start = time.monotonic()
            for i, batch in enumerate(self._batches):
                if self._pause(start + self.produced / self.rate - time.monotonic()):
                    break
                if self.restamp:
                    now = np.full(batch.num_rows, int(time.time() * 1000), dtype=np.int64)
                    batch = dataclasses.replace(batch, event_times=now)
                producer.produce(self.topic, encode_batch(batch), partition=i % max(1, partitions))
                producer.poll(0)
                self.produced += batch.num_rows
            if producer.flush(30) != 0:
                self.error = "the producer could not deliver every batch"
        except Exception as exc:  # reported by the demo's main loop
            self.error = f"producing samples failed: {exc}"


class EventFeed(Feed):
    """The generator's impressions and clicks, each sent when the wall clock reaches its
    event time, generated and encoded on the fly.

    Traffic comes from :meth:`TrafficGenerator.event_blocks` (columnar, a block of 512
    requests at a time) and is encoded by :class:`~pipeline.ingest.eventbytes.EventEncoder`
    straight to the Avro bodies :class:`~pipeline.ingest.producer.EventProducer` would
    send, keyed by request id (librdkafka's partitioner puts an impression and its
    clicks in the same partition of the equally partitioned topics). That is a few us of
    CPU per event instead of the ~30 us of building dicts up front and encoding them one
    by one, and memory stays one block. Producing skips per-message delivery callbacks:
    only failures are reported (``delivery.report.only.error``), counted in
    ``failed``, and make the feed fail.

    ``librdkafka_overrides`` go to the producer (the defaults are
    :func:`pipeline.kafka.producer`'s, as for ``EventProducer``, with a 50 ms linger).

    Event times are shifted by the wall time between the generator's ``start_time_ms``
    and the feed's start, so the first event is due at once. Each pass sends every event
    now due (passes at least ``PACE_S`` apart: one batch per pass, not a sleep per
    event); ``behind_s`` is the most an event was sent after its time, so a feed that
    cannot keep up with its rate shows it.
    """

    def __init__(
        self,
        bootstrap: str,
        impressions_topic: str,
        clicks_topic: str,
        generator: TrafficGenerator,
        n: int,
        **librdkafka_overrides: Any,
    ) -> None:
        super().__init__("demo-events")
        # 50 ms batches: fewer, larger produce requests for librdkafka and the broker
        # (each request costs syscalls on both sides), nothing against seconds of
        # freshness
        self._overrides = {"linger.ms": 50, **librdkafka_overrides}
        self.bootstrap = bootstrap
        self.topics = impressions_topic, clicks_topic
        self.generator, self.n = generator, n
        self.impressions = 0  # produced so far
        self.clicks = 0
        self.malformed = 0
        self.failed = 0  # deliveries the broker refused
        self.behind_s = 0.0
        self.cpu_s = 0.0  # this thread's CPU time (generating, encoding, producing)
        self.started_at: float | None = None  # time.monotonic() of the first send
        self.ended_at: float | None = None  # ... and after the last
        self._labels: list[npt.NDArray[np.bool_]] = []
        self._p: list[npt.NDArray[np.float64]] = []

    @property
    def expected_samples(self) -> int:
        return self.impressions

    def bayes_auc(self) -> float | None:
        """AUC of the true click probabilities against the labels a joiner with the
        generator's window gives, over the impressions produced (None before both
        labels were seen)."""
        from pipeline.ingest.generator import exact_auc

        if not self._p:
            return None
        labels, p = np.concatenate(self._labels), np.concatenate(self._p)
        if labels.all() or not labels.any():
            return None
        return exact_auc(labels, p)

    def _failure(self, err: Any, msg: Any) -> None:
        self.failed += 1

    def run(self) -> None:
        from pipeline import kafka
        from pipeline.config import KafkaSettings
        from pipeline.ingest.eventbytes import EventEncoder

        cpu0 = time.thread_time()
        try:
            producer = kafka.producer(
                KafkaSettings(bootstrap=self.bootstrap),
                **{"delivery.report.only.error": True, "on_delivery": self._failure},
                **self._overrides,
            )
            encoder = EventEncoder(self.generator)
            window = self.generator.config.attribution_window_ms
            shift = max(0, int(time.time() * 1000) - self.generator.config.start_time_ms)
            self.started_at = time.monotonic()
            for block in self.generator.event_blocks(self.n):
                for bad in block.malformed:
                    topic = self.topics[0 if bad.topic == "events.impressions" else 1]
                    _produce(producer, topic, [bad.data], [None])
                    self.malformed += 1
                imps = encoder.impressions(block, shift)
                clicks = encoder.clicks(block, shift)
                sent = self._paced(producer, imps, clicks)
                delay = block.click_delay_ms[:sent]
                self._labels.append((delay >= 0) & (delay <= window))
                self._p.append(block.p[:sent])
                if self._halt.is_set():
                    break
            if producer.flush(30) != 0:
                self.error = "the producer could not deliver every event within 30 s"
            elif self.failed:
                self.error = f"{self.failed} event(s) could not be delivered"
        except Exception as exc:  # reported by the demo's main loop
            self.error = f"producing events failed: {exc}"
        finally:
            self.ended_at = time.monotonic()
            self.cpu_s = time.thread_time() - cpu0

    def _paced(self, producer: Any, imps: EncodedEvents, clicks: EncodedEvents) -> int:
        """Send one block's events as the wall clock reaches them; impressions sent."""
        i = c = 0
        while i < len(imps) or c < len(clicks):
            now_ms = time.time() * 1000
            i2 = int(np.searchsorted(imps.times, now_ms, side="right"))
            c2 = int(np.searchsorted(clicks.times, now_ms, side="right"))
            if i2 == i and c2 == c:
                due = min(
                    imps.times[i] if i < len(imps) else np.inf,
                    clicks.times[c] if c < len(clicks) else np.inf,
                )
                if self._pause(max(PACE_S, (due - now_ms) / 1000)):
                    break
                continue
            oldest = min(imps.times[i] if i2 > i else np.inf, clicks.times[c] if c2 > c else np.inf)
            self.behind_s = max(self.behind_s, (now_ms - oldest) / 1000)
            _produce(producer, self.topics[0], imps.values[i:i2], imps.keys[i:i2])
            self.impressions += i2 - i
            _produce(producer, self.topics[1], clicks.values[c:c2], clicks.keys[c:c2])
            self.clicks += c2 - c
            i, c = i2, c2
            producer.poll(0)
            if self._halt.is_set():
                break
        return i


def _produce(
    producer: Any, topic: str, values: Sequence[bytes], keys: Sequence[bytes | None]
) -> None:
    """``produce`` each message, waiting for queue room (not failing) when it is full.

    ``map`` over a bound ``produce`` runs no bytecode per message (a Python loop
    adds about 0.3 us each). When librdkafka's queue is full, the message that did not
    fit is the last one ``map`` took: what is left of ``vals`` says which it was.
    """
    send, j, end = functools.partial(producer.produce, topic), 0, len(values)
    while j < end:
        vals = itertools.islice(values, j, None)
        try:
            collections.deque(map(send, vals, itertools.islice(keys, j, None)), maxlen=0)
            return
        except BufferError:  # queue full: serve it until there is room, then resume
            j = end - sum(1 for _ in vals) - 1
            producer.poll(0.05)
