"""Joiner checkpoints in a compacted changelog topic, and reading topics to their end.

Input partition ``p`` checkpoints into changelog partition ``p % partitions`` as a
chain of deltas (:mod:`pipeline.joiner.delta`): delta ``seq`` holds the rows that
changed since delta ``seq - 1``. Each delta is written as chunks under keys
``p/d/<seq>/<i>`` and an index ``p/i/<seq>`` (chunk count, SHA-256); then a manifest
``p/manifest`` names the deltas a restore needs, oldest first, and the output
positions the checkpoint covers. A restore reads them back and replays the chain.
Deltas no manifest needs any more (every row they wrote was rewritten later or has
left the state) get tombstones, so compaction keeps the topic at about the size of
the state. A delta without a manifest (a crash in between) is never read, and its
sequence number is never reused.

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
from dataclasses import dataclass
from typing import Any

from pipeline.codec.errors import CodecError
from pipeline.config import KafkaSettings
from pipeline.errors import PipelineError
from pipeline.ingest.dlq import decode_dead_letter
from pipeline.joiner.engine import JoinEngine
from pipeline.joiner.output import parse_headers
from pipeline.kafka import admin, consumer

__all__ = [
    "CHUNK_BYTES",
    "ChangelogStore",
    "Restored",
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


@dataclass
class Restored:
    """What a restore of one input partition found: its deltas and checkpoint facts."""

    blobs: list[bytes]  # the delta chain, oldest first (empty: no checkpoint)
    outputs: dict[str, Any]  # output positions the checkpoint covers
    seqs: list[int]


class ChangelogStore:
    """Checkpoint delta chains per input partition in a compacted topic."""

    def __init__(self, settings: KafkaSettings, topic: str, partitions: int) -> None:
        self.settings = settings
        self.topic = topic
        self.partitions = partitions
        self.next_seq: dict[int, int] = {}
        self.chain: dict[int, list[int]] = {}  # seqs the last manifest (or the next) needs
        self._chunks: dict[int, dict[int, int]] = {}  # partition -> seq -> chunks written

    def _changelog_partition(self, partition: int) -> int:
        return partition % self.partitions

    def load(self, partitions: Iterable[int], timeout_s: float = 60.0) -> dict[int, Restored]:
        """The latest complete checkpoint of each input partition."""
        wanted = sorted(set(partitions))
        parts = sorted({self._changelog_partition(p) for p in wanted})
        latest: dict[bytes, bytes] = {}
        manifests: dict[int, dict[str, Any]] = {}
        seen_seq: dict[int, int] = {}
        for msg in read_to_end(self.settings, [(self.topic, q, 0) for q in parts], timeout_s):
            key, value = msg.key(), msg.value()
            if key is None:
                continue
            name = key.decode()
            p_text, _, rest = name.partition("/")
            if not p_text.isdigit() or int(p_text) not in wanted:
                continue
            p = int(p_text)
            if rest.startswith(("d/", "i/")):
                seq = int(rest.split("/")[1])
                seen_seq[p] = max(seen_seq.get(p, 0), seq)
                if rest.startswith("i/") and value is not None:
                    self._chunks.setdefault(p, {})[seq] = json.loads(value)["chunks"]
            if value is None:
                latest.pop(key, None)
            elif rest == "manifest":
                manifests[p] = json.loads(value)
                if "seqs" not in manifests[p]:
                    raise PipelineError(
                        f"changelog {self.topic} holds a checkpoint of partition {p} in the "
                        "format of an older joiner (one full snapshot, state version 1), "
                        "which this one does not read: run it under a new --app-id (or "
                        "delete the changelog topic and the group) to start fresh"
                    )
                _prune(latest, p, manifests[p]["seqs"])
            else:
                latest[key] = value
        out = {}
        for p in wanted:
            self.next_seq[p] = seen_seq.get(p, 0) + 1
            out[p] = self._assemble(p, manifests.get(p), latest)
            self.chain[p] = list(out[p].seqs)
        return out

    def _assemble(
        self, partition: int, manifest: dict[str, Any] | None, latest: dict[bytes, bytes]
    ) -> Restored:
        if manifest is None:
            return Restored([], {}, [])
        where = f"changelog {self.topic}, partition {partition}"
        blobs = []
        for seq in manifest["seqs"]:
            raw = latest.get(f"{partition}/i/{seq}".encode())
            if raw is None:
                raise PipelineError(f"{where}: the index of checkpoint delta {seq} is missing")
            index = json.loads(raw)
            keys = [f"{partition}/d/{seq}/{i}".encode() for i in range(index["chunks"])]
            missing = [k.decode() for k in keys if k not in latest]
            if missing:
                raise PipelineError(f"{where}: checkpoint chunks {missing} are missing")
            blob = b"".join(latest[k] for k in keys)
            if hashlib.sha256(blob).hexdigest() != index["sha256"]:
                raise PipelineError(f"{where}: checkpoint delta {seq} fails its SHA-256 check")
            blobs.append(blob)
        return Restored(blobs, dict(manifest.get("outputs", {})), list(manifest["seqs"]))

    def write_delta(
        self, producer: Any, partition: int, seq: int, blob: bytes, oldest: int, on_delivery: Any
    ) -> list[int]:
        """Queue delta ``seq`` (from :meth:`take_seq`) of ``partition``; the chain a
        manifest written after it must name. ``oldest`` is the oldest delta a restore
        still needs (older ones leave the chain); ``on_delivery`` sees every message.
        """
        part = self._changelog_partition(partition)
        pieces = [blob[i : i + CHUNK_BYTES] for i in range(0, len(blob), CHUNK_BYTES)] or [b""]
        for i, piece in enumerate(pieces):
            key = f"{partition}/d/{seq}/{i}".encode()
            _produce(producer, self.topic, piece, key, part, on_delivery)
        index = {"chunks": len(pieces), "sha256": hashlib.sha256(blob).hexdigest()}
        key = f"{partition}/i/{seq}".encode()
        _produce(producer, self.topic, json.dumps(index).encode(), key, part, on_delivery)
        self._chunks.setdefault(partition, {})[seq] = len(pieces)
        chain = [s for s in self.chain.get(partition, []) if s >= oldest]
        self.chain[partition] = [*chain, seq]
        return list(self.chain[partition])

    def take_seq(self, partition: int) -> int:
        """The number of the partition's next delta."""
        seq = self.next_seq.setdefault(partition, 1)
        self.next_seq[partition] = seq + 1
        return seq

    def write_manifest(
        self,
        producer: Any,
        partition: int,
        seqs: list[int],
        outputs: dict[str, Any],
        on_delivery: Any,
    ) -> None:
        """Queue the manifest naming the delta chain ``seqs``: the checkpoint is durable
        once it is delivered."""
        doc = {"seqs": seqs, "outputs": outputs, "written_at": int(time.time() * 1000)}
        key = f"{partition}/manifest".encode()
        part = self._changelog_partition(partition)
        _produce(producer, self.topic, json.dumps(doc).encode(), key, part, on_delivery)

    def forget(self, producer: Any, partition: int, keep: list[int]) -> int:
        """Tombstone the deltas of ``partition`` below the oldest of ``keep``; count sent."""
        if not keep:
            return 0
        known = self._chunks.get(partition, {})
        old = [s for s in known if s < keep[0]]
        part = self._changelog_partition(partition)
        for seq in old:
            for i in range(known.pop(seq)):
                _produce(producer, self.topic, None, f"{partition}/d/{seq}/{i}".encode(), part)
            _produce(producer, self.topic, None, f"{partition}/i/{seq}".encode(), part)
        return len(old)


def _prune(latest: dict[bytes, bytes], partition: int, seqs: list[int]) -> None:
    """Drop deltas of ``partition`` older than what a manifest needs (bounded memory)."""
    if not seqs:
        return
    head = f"{partition}/".encode()
    for key in [k for k in latest if k.startswith(head)]:
        rest = key[len(head) :].split(b"/")
        if rest[0] in (b"d", b"i") and int(rest[1]) < seqs[0]:
            del latest[key]


def _produce(
    producer: Any, topic: str, value: bytes | None, key: bytes, partition: int, cb: Any = None
) -> None:
    while True:
        try:
            producer.produce(topic, value, key=key, partition=partition, on_delivery=cb)
            return
        except BufferError:
            producer.poll(0.05)


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
                source = decode_dead_letter(msg.value() or b"")["source_partition"]
            except CodecError:
                continue
            if after_checkpoint(source, tp, offset):
                dead += engine.recover_dead_letter(msg.value()) is not None
    return rows, dead
