"""The demo's data: paced producers of events (for the joiner) or of sample batches.

A feed is a thread that produces a time-ordered plan at wall-clock pace and counts
what it produced. Three plans:

* :class:`EventFeed`: the synthetic generator's impressions and clicks, each sent to
  ``events.impressions`` / ``events.clicks`` when the wall clock reaches its event
  time (the generator starts at "now"), for ``pipeline join`` to label;
* :class:`SampleFeed` over the generator's sample batches (labels already known,
  no joiner), or over a dataset's batches with their event times restamped to the
  wall clock when sent, so freshness measures the pipeline, not the data's age.

``expected_samples`` is what the trainers must end up training: one sample per
impression (the demo's joiner keeps every negative) or per produced row.
"""

from __future__ import annotations

import dataclasses
import heapq
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from pipeline.codec.samplebatch import SampleBatch

__all__ = ["EventFeed", "Feed", "SampleFeed"]


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
        """Sleep up to ``seconds``; True when stopped meanwhile."""
        return self._halt.wait(max(0.0, seconds))


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
    """Impressions and clicks, each sent when the wall clock reaches its event time.

    Event times are shifted by the wall time between ``start_ms`` (the generator's
    start) and the feed's start, so the time spent generating is not produced as a
    burst of events that are already old.
    """

    def __init__(
        self,
        bootstrap: str,
        impressions_topic: str,
        clicks_topic: str,
        impressions: list[dict[str, Any]],
        clicks: list[dict[str, Any]],
        start_ms: int,
    ) -> None:
        super().__init__("demo-events")
        self.start_ms = start_ms
        self.bootstrap = bootstrap
        self.topics = impressions_topic, clicks_topic
        self._impressions, self._clicks = impressions, clicks
        self.impressions = 0  # produced so far
        self.clicks = 0

    @property
    def expected_samples(self) -> int:
        return self.impressions

    def _plan(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(event time, 0 impression / 1 click, record) in time order, impressions first."""
        return heapq.merge(
            ((r["event_time"], 0, r) for r in self._impressions),
            ((r["event_time"], 1, r) for r in self._clicks),
            key=lambda e: (e[0], e[1]),
        )

    def run(self) -> None:
        from pipeline.config import KafkaSettings
        from pipeline.ingest.producer import EventProducer

        try:
            producer = EventProducer(KafkaSettings(bootstrap=self.bootstrap), *self.topics)
            shift = max(0, int(time.time() * 1000) - self.start_ms)
            with producer:
                for event_time, kind, record in self._plan():
                    event_time += shift
                    record = {**record, "event_time": event_time}
                    wait_s = event_time / 1000 - time.time()
                    if wait_s > 0.002 and self._pause(wait_s):
                        break
                    if self._halt.is_set():
                        break
                    if kind == 0:
                        producer.impression(record)
                        self.impressions += 1
                    else:
                        producer.click(record)
                        self.clicks += 1
        except Exception as exc:  # reported by the demo's main loop
            self.error = f"producing events failed: {exc}"
