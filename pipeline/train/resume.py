"""Resume a trainer group from a snapshot: commit the snapshot's offsets for the group.

``pipeline train --resume SNAPSHOT`` calls :func:`seek_group` before the trainer
joins its group, so every member starts where the snapshot's cut left off. Run it
with the group stopped (a running member would overwrite the positions with its
own commits); the restored shard servers (``pipeline ps --restore``) hold the state
of the same cut.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline import kafka as kafka_io
from pipeline.config import KafkaSettings
from pipeline.errors import PipelineError

__all__ = ["seek_group"]


def seek_group(
    settings: KafkaSettings, group: str, positions: Mapping[tuple[str, int], int]
) -> dict[tuple[str, int], int]:
    """Commit ``positions`` (next offset per topic-partition) as ``group``'s offsets."""
    from confluent_kafka import KafkaException, TopicPartition

    if not positions:
        raise PipelineError("the snapshot records no trainer offsets: nothing to resume from")
    consumer = kafka_io.consumer(settings, group, **{"enable.auto.commit": False})
    try:
        wanted = [TopicPartition(t, p, o) for (t, p), o in sorted(positions.items())]
        try:
            result = consumer.commit(offsets=wanted, asynchronous=False)
        except KafkaException as exc:
            raise PipelineError(f"seeking group {group!r} to the snapshot: {exc}") from None
        failed = [tp for tp in result or () if tp.error is not None]
        if failed:
            raise PipelineError(
                f"seeking group {group!r}: {failed[0].topic}[{failed[0].partition}] "
                f"{failed[0].error} (is a member of the group still running?)"
            )
    finally:
        consumer.close()
    return dict(positions)
