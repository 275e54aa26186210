"""Joiner checkpoints in a compacted changelog topic, and reading topics to their end.

A checkpoint of input partition ``p`` is written to changelog partition
``p % partitions`` as chunks under keys ``p/<slot>/<i>`` followed by a manifest
under ``p/manifest`` naming the slot, the chunk count and a SHA-256. The slot
alternates between 0 and 1, so a checkpoint cut short by a crash never overwrites
chunks the last complete manifest points to, and compaction keeps exactly what a
restore needs.

"The end" of a partition is taken from the high watermark that fetch responses
carry (``get_watermark_offsets(cached=True)``), never from ListOffsets, whose
answer the embedded broker gets wrong (too low).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from pipeline.codec import avro
from pipeline.codec.errors import CodecError
from pipeline.config import KafkaSettings
from pipeline.errors import PipelineError
from pipeline.joiner.engine import JoinEngine
from pipeline.joiner.output import parse_headers
from pipeline.kafka import admin, consumer

__all__ = [
    "CHUNK_BYTES",
    "ChangelogStore",
    "ensure_compacted_topic",
    "read_to_end",
    "recover_outputs",
]

CHUNK_BYTES = 512 * 1024


def ensure_compacted_topic(settings: KafkaSettings, topic: str, partitions: int) -> int:
    """Create ``topic`` (cleanup.policy=compact) unless it exists; its partition count."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import NewTopic

    client = admin(settings)
    meta = client.list_topics(timeout=10)
    if topic in meta.topics:
        return len(meta.topics[topic].partitions)
    replication = min(3, max(1, len(meta.brokers)))
    new = NewTopic(topic, partitions, replication, config={"cleanup.policy": "compact"})
    try:
        client.create_topics([new], request_timeout=10)[topic].result()
    except KafkaException as exc:
        if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
            raise PipelineError(f"creating changelog topic {topic} failed: {exc}") from None
    return partitions


def read_to_end(
    settings: KafkaSettings, starts: Sequence[tuple[str, int, int]], timeout_s: float = 30.0
) -> Iterator[Any]:
    """Messages of each (topic, partition) from its start offset to the current end."""
    from confluent_kafka import TopicPartition

    if not starts:
        return
    cons = consumer(settings, f"joiner-reader-{uuid.uuid4().hex[:8]}")
    try:
        cons.assign([TopicPartition(t, p, max(0, o)) for t, p, o in starts])
        next_offset = {(t, p): max(0, o) for t, p, o in starts}
        deadline = time.monotonic() + timeout_s
        while True:
            for msg in cons.consume(num_messages=1000, timeout=0.2):
                if msg.error():
                    raise PipelineError(f"reading {msg.topic()}: {msg.error()}")
                next_offset[(msg.topic(), msg.partition())] = msg.offset() + 1
                yield msg
            behind = []
            for (topic, part), offset in next_offset.items():
                _, high = cons.get_watermark_offsets(TopicPartition(topic, part), cached=True)
                if high < 0 or offset < high:
                    behind.append(f"{topic}[{part}]")
            if not behind:
                return
            if time.monotonic() > deadline:
                raise PipelineError(
                    f"could not read {', '.join(behind)} to the end in {timeout_s}s"
                )
    finally:
        cons.close()


class ChangelogStore:
    """Checkpoint blobs per input partition in a compacted topic (double-buffered)."""

    def __init__(self, settings: KafkaSettings, topic: str, partitions: int) -> None:
        self.settings = settings
        self.topic = topic
        self.partitions = partitions
        self._epochs: dict[int, int] = {}

    def _changelog_partition(self, partition: int) -> int:
        return partition % self.partitions

    def load(self, partitions: Iterable[int], timeout_s: float = 30.0) -> dict[int, bytes | None]:
        """The latest complete checkpoint of each input partition (None: there is none)."""
        wanted = sorted(set(partitions))
        parts = sorted({self._changelog_partition(p) for p in wanted})
        latest: dict[bytes, bytes] = {}
        for msg in read_to_end(self.settings, [(self.topic, q, 0) for q in parts], timeout_s):
            if msg.key() is not None and msg.value() is not None:
                latest[msg.key()] = msg.value()
        return {p: self._assemble(p, latest) for p in wanted}

    def _assemble(self, partition: int, latest: dict[bytes, bytes]) -> bytes | None:
        manifest_raw = latest.get(f"{partition}/manifest".encode())
        if manifest_raw is None:
            self._epochs[partition] = 0
            return None
        manifest = json.loads(manifest_raw)
        keys = [f"{partition}/{manifest['slot']}/{i}".encode() for i in range(manifest["chunks"])]
        missing = [k.decode() for k in keys if k not in latest]
        where = f"changelog {self.topic}, partition {partition}"
        if missing:
            raise PipelineError(f"{where}: checkpoint chunks {missing} are missing")
        blob = b"".join(latest[k] for k in keys)
        if hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
            raise PipelineError(f"{where}: checkpoint fails its SHA-256 check")
        self._epochs[partition] = int(manifest["epoch"])
        return blob

    def save(self, producer: Any, partition: int, blob: bytes) -> None:
        """Queue a checkpoint on ``producer``; durable once the producer is flushed."""
        epoch = self._epochs.get(partition, 0) + 1
        slot = epoch % 2
        part = self._changelog_partition(partition)
        pieces = [blob[i : i + CHUNK_BYTES] for i in range(0, len(blob), CHUNK_BYTES)] or [b""]
        for i, piece in enumerate(pieces):
            producer.produce(
                self.topic, piece, key=f"{partition}/{slot}/{i}".encode(), partition=part
            )
        manifest = {
            "epoch": epoch,
            "slot": slot,
            "chunks": len(pieces),
            "sha256": hashlib.sha256(blob).hexdigest(),
            "written_at": int(time.time() * 1000),
        }
        producer.produce(
            self.topic,
            json.dumps(manifest).encode(),
            key=f"{partition}/manifest".encode(),
            partition=part,
        )
        self._epochs[partition] = epoch


def recover_outputs(
    settings: KafkaSettings, engine: JoinEngine, starts: dict[int, dict[tuple[str, int], int]]
) -> tuple[int, int]:
    """Show ``engine`` what its restored partitions emitted after their checkpoints.

    ``starts`` maps each restored input partition to the (topic, partition) -> offset
    its checkpoint recorded for ``samples`` and ``samples.dlq``; everything from there
    to the end was emitted after the checkpoint, and replay must not emit it again.
    Returns (sample rows, dead letters) noted.
    """
    lowest: dict[tuple[str, int], int] = {}
    for positions in starts.values():
        for tp, pos in positions.items():
            lowest[tp] = min(lowest.get(tp, pos), pos)

    def after_checkpoint(source: int, tp: tuple[str, int], offset: int) -> bool:
        return source in starts and offset >= starts[source].get(tp, 1 << 62)

    rows = dead = 0
    for msg in read_to_end(settings, [(t, q, pos) for (t, q), pos in lowest.items()]):
        tp, offset = (msg.topic(), msg.partition()), msg.offset()
        if msg.topic() == engine.topics.samples:
            parsed = parse_headers(msg.headers())
            if parsed is not None and after_checkpoint(parsed[0], tp, offset):
                rows += engine.recover_sample(msg.headers(), msg.value())
        else:
            try:  # samples.dlq is shared: other writers' records are not ours to judge
                source = avro.decode("DeadLetter", msg.value() or b"")["source_partition"]
            except CodecError:
                continue
            if after_checkpoint(source, tp, offset):
                dead += engine.recover_dead_letter(msg.value()) is not None
    return rows, dead
