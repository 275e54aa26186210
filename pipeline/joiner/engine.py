"""The joiner's message-level core, shared by both engines and free of Kafka I/O.

:class:`JoinEngine` turns input messages (topic, partition, offset, bytes) into
output records (``samples`` batches and ``samples.dlq`` dead letters), owns one
:class:`~pipeline.joiner.logic.PartitionJoiner` per assigned input partition, and
serialises a partition's state with the input offsets it covers into one checkpoint
blob. The engines only move bytes: consume, produce, flush, store checkpoints.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.codec import avro
from pipeline.codec.errors import CodecError
from pipeline.codec.samplebatch import decode_batch
from pipeline.joiner.logic import Counters, JoinConfig, Kind, OrphanClick, Output, PartitionJoiner
from pipeline.joiner.output import OutBatch, SampleBatcher, parse_headers
from pipeline.joiner.records import (
    ORPHAN_CLICK,
    Origin,
    dead_letter,
    decode_click,
    decode_impression,
)

__all__ = ["STATE_VERSION", "JoinEngine", "OutRecord", "Topics"]

STATE_VERSION = 1


@dataclass(frozen=True)
class Topics:
    """Physical topic names the joiner reads and writes."""

    impressions: str
    clicks: str
    samples: str
    dlq: str


@dataclass(frozen=True)
class OutRecord:
    """A message to produce; ``partition`` None lets the producer choose."""

    topic: str
    partition: int | None
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    source: int  # the input partition it comes from


class JoinEngine:
    """Decode, join, batch and dead-letter; one joiner per assigned input partition."""

    def __init__(self, config: JoinConfig, topics: Topics, batcher: SampleBatcher) -> None:
        self.config = config
        self.topics = topics
        self.batcher = batcher
        self.joiners: dict[int, PartitionJoiner] = {}
        self.positions: dict[int, dict[str, int]] = {}  # input partition -> next offsets
        self._dlq_seen: set[tuple[str, int, int]] = set()  # dead letters found after a crash

    # -- partitions ------------------------------------------------------------------

    def assign(self, partition: int, blob: bytes | None, now_ms: int) -> dict[str, int]:
        """Take ``partition`` from a checkpoint (or fresh); returns the offsets to resume at.

        The result maps ``impressions``/``clicks`` to the next offsets to read; empty
        when there is no checkpoint (start per ``start_from``).
        """
        if blob is None:
            self.joiners[partition] = PartitionJoiner(self.config, now_ms)
            self.positions[partition] = {}
            return {}
        doc = json.loads(zlib.decompress(blob))
        if doc.get("version") != STATE_VERSION or doc.get("partition") != partition:
            raise ValueError(
                f"checkpoint of partition {partition} has version {doc.get('version')} "
                f"and partition {doc.get('partition')}; expected {STATE_VERSION}, {partition}"
            )
        self.joiners[partition] = PartitionJoiner.from_state(self.config, doc["state"], now_ms)
        self.positions[partition] = dict(doc["offsets"])
        return dict(doc["offsets"])

    def revoke(self, partition: int) -> None:
        """Forget ``partition`` (after its last checkpoint, or when it was lost)."""
        self.joiners.pop(partition, None)
        self.positions.pop(partition, None)
        self.batcher.drain(partition)

    def checkpoint(self, partition: int, outputs: Mapping[str, Any] | None = None) -> bytes:
        """State + input offsets of ``partition`` as one blob (call after draining)."""
        doc = {
            "version": STATE_VERSION,
            "partition": partition,
            "offsets": self.positions[partition],
            "outputs": dict(outputs or {}),
            "state": self.joiners[partition].to_state(),
        }
        return zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), 1)

    @staticmethod
    def checkpoint_outputs(blob: bytes) -> dict[str, Any]:
        """The output positions recorded in a checkpoint (where replayed output may start)."""
        return dict(json.loads(zlib.decompress(blob))["outputs"])

    def recover_sample(self, headers: list[tuple[str, bytes]] | None, value: bytes) -> int:
        """Note a ``samples`` message emitted after its partition's checkpoint.

        After a crash the engine reads what it emitted after the checkpoints it
        restored; replaying input then re-emits none of those rows. Returns the rows
        noted (0 for messages of other joiners or partitions not assigned here).
        """
        parsed = parse_headers(headers)
        if parsed is None or parsed[0] not in self.joiners:
            return 0
        partition, keys, kinds = parsed
        joiner = self.joiners[partition]
        times = decode_batch(value).event_times
        for key_hash, kind, event_time in zip(keys, kinds, times, strict=True):
            joiner.recover_emitted(int(key_hash), Kind(int(kind)), int(event_time))
        return len(keys)

    def recover_dead_letter(self, value: bytes) -> tuple[str, int, int] | None:
        """Note a dead letter emitted after a checkpoint; returns its source position."""
        rec = avro.decode("DeadLetter", value)
        ident = (rec["source_topic"], rec["source_partition"], rec["source_offset"])
        inputs = (self.topics.impressions, self.topics.clicks)
        if ident[0] not in inputs or ident[1] not in self.joiners:
            return None
        self._dlq_seen.add(ident)
        return ident

    # -- messages ----------------------------------------------------------------------

    def handle(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes, now_ms: int
    ) -> list[OutRecord]:
        """Process one input message of an assigned partition."""
        joiner = self.joiners[partition]
        self.positions[partition][self._stream(topic)] = offset + 1
        origin = Origin(topic, partition, offset, key, value)
        try:
            if topic == self.topics.impressions:
                outputs = joiner.impression(decode_impression(value), now_ms)
            else:
                outputs = joiner.click(decode_click(value), origin, now_ms)
        except CodecError as exc:
            joiner.counters.malformed += 1
            return self._dead(partition, origin, exc.reason, exc.message, now_ms)
        return self._route(partition, outputs, now_ms)

    def mark_busy(self, partition: int, topic: str, now_ms: int) -> None:
        """``topic`` has unread messages in ``partition``: its stream is not idle."""
        stream = {"impressions": "impression", "clicks": "click"}[self._stream(topic)]
        self.joiners[partition].mark_busy(stream, now_ms)

    def tick(self, now_ms: int) -> list[OutRecord]:
        """Idle-advance every partition's watermark and emit lingering batches."""
        out: list[OutRecord] = []
        for partition, joiner in self.joiners.items():
            out += self._route(partition, joiner.advance(now_ms), now_ms)
        return out + self._batches(self.batcher.due(now_ms))

    def drain(self, partition: int | None = None) -> list[OutRecord]:
        """Every buffered batch (of one partition, or all), e.g. before a checkpoint."""
        return self._batches(self.batcher.drain(partition))

    def counters(self) -> Counters:
        """Totals over the assigned partitions."""
        total = Counters()
        for joiner in self.joiners.values():
            total.add(joiner.counters)
        return total

    def stats(self) -> dict[str, int]:
        """Counters plus open windows and waiting clicks, for logs and the CLI."""
        doc = asdict(self.counters())
        doc["pending"] = sum(j.pending_count for j in self.joiners.values())
        doc["waiting_clicks"] = sum(j.orphan_count for j in self.joiners.values())
        return doc

    # -- internals ----------------------------------------------------------------------

    def _stream(self, topic: str) -> str:
        if topic == self.topics.impressions:
            return "impressions"
        if topic == self.topics.clicks:
            return "clicks"
        raise ValueError(f"{topic} is not an input topic of the joiner")

    def _route(self, partition: int, outputs: list[Output], now_ms: int) -> list[OutRecord]:
        out: list[OutRecord] = []
        samples = []
        for item in outputs:
            if isinstance(item, OrphanClick):
                error = f"no impression for request {item.click.request_id!r} item "
                error += f"{item.click.item_id!r} before the watermark passed the click"
                out += self._dead(partition, item.origin, ORPHAN_CLICK, error, now_ms)
            else:
                samples.append(item)
        return out + self._batches(self.batcher.add(partition, samples, now_ms))

    def _batches(self, batches: list[OutBatch]) -> list[OutRecord]:
        topic = self.topics.samples
        return [OutRecord(topic, b.partition, None, b.value, b.headers, b.source) for b in batches]

    def _dead(
        self, partition: int, origin: Origin, reason: str, error: str, now_ms: int
    ) -> list[OutRecord]:
        ident = (origin.topic, origin.partition, origin.offset)
        if ident in self._dlq_seen:
            return []  # already dead-lettered before a crash
        value = dead_letter(origin, reason, error, now_ms)
        return [OutRecord(self.topics.dlq, None, origin.key, value, [], partition)]
