"""Consumer-group lag as a Kafka operator reads it: end offset minus committed offset.

:class:`GroupLag` asks the broker for a group's committed offsets (OffsetFetch, via a
consumer that carries the group id but never subscribes, so it does not join) and
for each partition's high watermark (ListOffsets). Lag is counted in messages; a
partition with no commit counts from its low watermark. A committed offset can run
at most one message ahead of a watermark a broker under-reports; such a lag counts 0.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GroupLag"]


class GroupLag:
    """Messages ``group`` has not committed on ``topics`` (summed over partitions)."""

    def __init__(
        self, bootstrap: str, group: str, topics: list[str], timeout_s: float = 2.0
    ) -> None:
        from confluent_kafka import Consumer

        self.group, self.topics, self.timeout_s = group, topics, timeout_s
        self._consumer: Any = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "enable.auto.commit": False,
                "log_level": 0,
            }
        )
        self._partitions: list[Any] = []

    def _topic_partitions(self) -> list[Any]:
        from confluent_kafka import TopicPartition

        if not self._partitions:
            meta = self._consumer.list_topics(timeout=self.timeout_s)
            self._partitions = [
                TopicPartition(t, p)
                for t in self.topics
                if t in meta.topics
                for p in sorted(meta.topics[t].partitions)
            ]
        return self._partitions

    def messages(self) -> int | None:
        """The group's lag in messages now, or None when the broker did not answer."""
        measured = self.measure()
        return None if measured is None else measured[0]

    def measure(self) -> tuple[int, int] | None:
        """(lag, end offsets summed over the partitions) now, or None when the broker did
        not answer. The end offsets count the messages written so far, so two readings
        give the topics' message rate, and lag / rate is the lag in seconds of traffic."""
        from confluent_kafka import KafkaException

        try:
            parts = self._topic_partitions()
            if not parts:
                return None
            committed = self._consumer.committed(parts, timeout=self.timeout_s)
            total = ends = 0
            for tp in committed:
                low, high = self._consumer.get_watermark_offsets(tp, timeout=self.timeout_s)
                done = tp.offset if tp.offset >= 0 else low
                total += max(0, high - done)
                ends += high
            return total, ends
        except KafkaException:
            return None

    def close(self) -> None:
        self._consumer.close()
