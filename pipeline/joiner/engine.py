"""The joiner's message-level core, shared by both engines and free of Kafka I/O.

:class:`JoinEngine` turns polled input messages (topic, partition, offset, key,
bytes) into output records (``samples`` batches and ``samples.dlq`` dead letters),
owns one :class:`~pipeline.joiner.logic.PartitionJoiner` per assigned input
partition, and writes a partition's state with the input offsets it covers as
checkpoint deltas (:mod:`pipeline.joiner.delta`). A poll is handled in bulk: all
bodies decoded and hashed together (:mod:`pipeline.joiner.events`), then each
partition's events joined as one batch. The engines only move bytes: consume,
produce, flush, store checkpoints.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.codec.samplebatch import decode_batch
from pipeline.ingest.dlq import decode_dead_letter
from pipeline.ingest.limits import BROKER_DEFAULT_MAX_MESSAGE_BYTES, declared_limit
from pipeline.joiner import delta
from pipeline.joiner.events import decode_events
from pipeline.joiner.logic import Counters, EventBatch, JoinConfig, JoinResult, PartitionJoiner
from pipeline.joiner.output import OutBatch, SampleBatcher, parse_headers
from pipeline.joiner.records import ORPHAN_CLICK, Origin, dead_letter

__all__ = ["STATE_VERSION", "JoinEngine", "OutRecord", "Topics"]

STATE_VERSION = 2  # 1: one JSON document per checkpoint; 2: deltas of changed rows


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

    def __init__(
        self, config: JoinConfig, topics: Topics, batcher: SampleBatcher, dlq_partitions: int = 1
    ) -> None:
        self.config = config
        self.topics = topics
        self.batcher = batcher
        self.dlq_partitions = dlq_partitions
        self.joiners: dict[int, PartitionJoiner] = {}
        self.positions: dict[int, dict[str, int]] = {}  # input partition -> next offsets
        self._dlq_seen: set[tuple[str, int, int]] = set()  # dead letters found after a crash
        # bigger messages are dead-lettered as their first bytes (see ingest/dlq.py)
        self._dlq_limit = declared_limit(topics.dlq) or BROKER_DEFAULT_MAX_MESSAGE_BYTES

    # -- partitions ------------------------------------------------------------------

    def assign(self, partition: int, blobs: Sequence[bytes] | None, now_ms: int) -> dict[str, int]:
        """Take ``partition`` from its checkpoint deltas (oldest first) or fresh.

        Returns the offsets to resume at (``impressions``/``clicks`` -> next offset);
        empty when there is no checkpoint (start per ``start_from``).
        """
        joiner = PartitionJoiner(self.config, now_ms)
        self.joiners[partition] = joiner
        if not blobs:
            self.positions[partition] = {}
            return {}
        first = self.header(blobs[-1])
        if first.get("version") != STATE_VERSION or first.get("partition") != partition:
            self.joiners.pop(partition)
            raise ValueError(
                f"checkpoint of partition {partition} has version {first.get('version')} "
                f"and partition {first.get('partition')}; expected {STATE_VERSION}, {partition}"
            )
        header = delta.restore(joiner, list(blobs))
        self.positions[partition] = dict(header["offsets"])
        return dict(header["offsets"])

    def revoke(self, partition: int) -> None:
        """Forget ``partition`` (after its last checkpoint, or when it was lost)."""
        self.joiners.pop(partition, None)
        self.positions.pop(partition, None)
        self.batcher.drain(partition)

    def delta(
        self, partition: int, seq: int, outputs: dict[str, Any] | None = None, full: bool = False
    ) -> bytes:
        """Checkpoint delta ``seq`` of ``partition``: the rows changed since the last one
        (every row when ``full``), its offsets and output positions (call after draining)."""
        joiner = self.joiners[partition]
        meta = {
            "version": STATE_VERSION,
            "partition": partition,
            "seq": seq,
            "offsets": self.positions[partition],
            "outputs": dict(outputs or {}),
        }
        return delta.encode_delta(joiner, delta.take_changes(joiner, seq, full), meta)

    def oldest_needed(self, partition: int, default: int) -> int:
        """The oldest checkpoint delta a restore of ``partition`` still needs."""
        return delta.oldest_needed(self.joiners[partition], default)

    def checkpoint(self, partition: int, outputs: dict[str, Any] | None = None) -> bytes:
        """The whole state of ``partition`` as one self-contained blob (a full delta)."""
        return self.delta(partition, 0, outputs, full=True)

    @staticmethod
    def header(blob: bytes) -> dict[str, Any]:
        """The JSON header of a checkpoint delta (its offsets, outputs, seq ...)."""
        if blob[:4] != delta.MAGIC:
            raise ValueError("not a joiner checkpoint (bad magic)")
        (size,) = struct.unpack_from("<I", blob, 4)
        doc: dict[str, Any] = json.loads(blob[8 : 8 + size])
        return doc

    @staticmethod
    def checkpoint_outputs(blob: bytes) -> dict[str, Any]:
        """The output positions recorded in a checkpoint (where replayed output may start)."""
        return dict(JoinEngine.header(blob)["outputs"])

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
        times = decode_batch(value).event_times
        self.joiners[partition].recover_emitted(keys, kinds, times)
        return len(keys)

    def recover_dead_letter(self, value: bytes) -> tuple[str, int, int] | None:
        """Note a dead letter emitted after a checkpoint; returns its source position."""
        rec = decode_dead_letter(value)
        ident = (rec["source_topic"], rec["source_partition"], rec["source_offset"])
        inputs = (self.topics.impressions, self.topics.clicks)
        if ident[0] not in inputs or ident[1] not in self.joiners:
            return None
        self._dlq_seen.add(ident)
        return ident

    # -- messages ----------------------------------------------------------------------

    def handle_many(
        self,
        topics: Sequence[str],
        partitions: Sequence[int],
        values: Sequence[bytes],
        now_ms: int,
        offset_of: Callable[[int], int],
        key_of: Callable[[int], bytes | None],
    ) -> list[OutRecord]:
        """Process polled messages of assigned partitions, in the order consumed.

        Offsets and keys are asked for per message (``offset_of(i)``, ``key_of(i)``)
        only where needed: the last message of each partition and stream, and messages
        that become dead letters. Reading them off every message costs more.
        """
        if not values:
            return []
        clicks_topic = self.topics.clicks
        is_click = [t == clicks_topic for t in topics]
        for t in set(topics):
            self._stream(t)  # rejects a topic that is not an input
        part = np.fromiter(partitions, dtype=np.int64, count=len(values))
        self._advance_positions(part, np.array(is_click, dtype=bool), offset_of)

        def origin(i: int) -> Origin:
            return Origin(topics[i], int(part[i]), offset_of(i), key_of(i), values[i])

        decoded = decode_events(self.config, is_click, values, origin)
        out: list[OutRecord] = []
        for rej in decoded.rejected:
            p = int(part[rej.index])
            self.joiners[p].counters.malformed += 1
            out += self._dead(p, origin(rej.index), rej.reason, rej.error, now_ms)
        ev_part = part[decoded.index]
        for p in np.unique(ev_part).tolist():
            sel = np.flatnonzero(ev_part == p)
            batch = _take(decoded.events, sel)
            out += self._route(p, self.joiners[p].process(batch, now_ms), now_ms)
        return out

    def handle(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes, now_ms: int
    ) -> list[OutRecord]:
        """Process one input message of an assigned partition."""
        return self.handle_many(
            [topic], [partition], [value], now_ms, lambda _: offset, lambda _: key
        )

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

    def forget_dead_letters_before(self, partition: int) -> None:
        """Dead letters below the checkpointed offsets can never be replayed: drop them."""
        pos = self.positions.get(partition, {})
        done = {self.topics.impressions: pos.get("impressions", 0)}
        done[self.topics.clicks] = pos.get("clicks", 0)
        self._dlq_seen = {
            d for d in self._dlq_seen if d[1] != partition or d[2] >= done.get(d[0], 0)
        }

    def counters(self) -> Counters:
        """Totals over the assigned partitions."""
        total = Counters()
        for joiner in self.joiners.values():
            total.add(joiner.counters)
        return total

    def stats(self) -> dict[str, int]:
        """Counters plus open windows, held keys and waiting clicks, for logs and the CLI."""
        doc = asdict(self.counters())
        doc["pending"] = sum(j.pending_count for j in self.joiners.values())
        doc["remembered"] = sum(j.remembered_count for j in self.joiners.values())
        doc["waiting_clicks"] = sum(j.orphan_count for j in self.joiners.values())
        doc["state_bytes"] = sum(j.table.nbytes() for j in self.joiners.values())
        return doc

    # -- internals ----------------------------------------------------------------------

    def _stream(self, topic: str) -> str:
        if topic == self.topics.impressions:
            return "impressions"
        if topic == self.topics.clicks:
            return "clicks"
        raise ValueError(f"{topic} is not an input topic of the joiner")

    def _advance_positions(self, part: Any, is_click: Any, offset_of: Callable[[int], int]) -> None:
        """Next offsets per (partition, stream): one past the last message polled."""
        code = part * 2 + is_click
        order = np.argsort(code, kind="stable")  # offsets grow within each (partition, topic)
        sc = code[order]
        last = order[np.flatnonzero(np.concatenate([sc[1:] != sc[:-1], [True]]))]
        for c, i in zip(code[last].tolist(), last.tolist(), strict=True):
            o = offset_of(i)
            stream = "clicks" if c & 1 else "impressions"
            positions = self.positions[c >> 1]
            positions[stream] = max(positions.get(stream, 0), o + 1)

    def _route(self, partition: int, result: JoinResult, now_ms: int) -> list[OutRecord]:
        out: list[OutRecord] = []
        for item in result.orphans:
            error = f"no impression for request {item.click.request_id!r} item "
            error += f"{item.click.item_id!r} before the watermark passed the click"
            out += self._dead(partition, item.origin, ORPHAN_CLICK, error, now_ms)
        return out + self._batches(self.batcher.add(partition, result.samples, now_ms))

    def _batches(self, batches: list[OutBatch]) -> list[OutRecord]:
        topic = self.topics.samples
        return [OutRecord(topic, b.partition, None, b.value, b.headers, b.source) for b in batches]

    def _dead(
        self, partition: int, origin: Origin, reason: str, error: str, now_ms: int
    ) -> list[OutRecord]:
        ident = (origin.topic, origin.partition, origin.offset)
        if ident in self._dlq_seen:
            return []  # already dead-lettered before a crash
        value, key = dead_letter(origin, reason, error, now_ms, self._dlq_limit)
        q = partition % self.dlq_partitions
        return [OutRecord(self.topics.dlq, q, key, value, [], partition)]


def _take(b: EventBatch, idx: Any) -> EventBatch:
    """Events ``idx`` of a batch (the orphan lookup follows the selection)."""
    if len(idx) == len(b):
        return b
    base = b.orphan
    return EventBatch(
        click=b.click[idx],
        time=b.time[idx],
        key=b.key[idx],
        user=b.user[idx],
        keep=b.keep[idx],
        ids=b.ids[idx],
        present=b.present[idx],
        unknown=b.unknown[idx],
        orphan=lambda i: base(int(idx[i])),
    )
