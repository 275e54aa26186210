"""Batching joined samples into columnar ``SampleBatch`` messages for ``samples``.

Samples are routed by user id (``hash64("user_id", user) % partitions``), so all of a
user's samples reach the same trainer partition in order, and buffered per
(source partition, output partition) until ``batch_size`` rows or ``linger_ms``.
Every message carries headers naming its source partition and, per row, the join
key hash and :class:`~pipeline.joiner.logic.Kind`: that is what lets a restarted
joiner recognise samples it already emitted (see ``docs/joiner.md``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pipeline.codec.hashing import hash64
from pipeline.codec.samplebatch import encode_batch, from_rows
from pipeline.codec.slots import SlotConfig
from pipeline.joiner.logic import Joined

__all__ = [
    "HEADER_KEYS",
    "HEADER_KINDS",
    "HEADER_SOURCE",
    "OutBatch",
    "SampleBatcher",
    "parse_headers",
]

HEADER_SOURCE = "joiner.source"  # ASCII decimal input partition
HEADER_KEYS = "joiner.keys"  # '<u8' [N] join key hashes
HEADER_KINDS = "joiner.kinds"  # uint8 [N] Kind per row


@dataclass(frozen=True)
class OutBatch:
    """One encoded ``samples`` message and where it goes."""

    source: int
    partition: int
    value: bytes
    headers: list[tuple[str, bytes]]
    rows: int


@dataclass
class _Buffer:
    started_ms: int
    rows: list[Joined] = field(default_factory=list)


class SampleBatcher:
    """Count/linger batching of :class:`Joined` samples, per source and output partition."""

    def __init__(self, slots: SlotConfig, partitions: int, batch_size: int, linger_ms: int) -> None:
        if partitions < 1 or batch_size < 1 or linger_ms < 0:
            raise ValueError("partitions and batch_size must be >= 1, linger_ms >= 0")
        self.slots = slots
        self.partitions = partitions
        self.batch_size = batch_size
        self.linger_ms = linger_ms
        self._buffers: dict[tuple[int, int], _Buffer] = {}

    def route(self, user_id: str) -> int:
        """Output partition of a user's samples."""
        return hash64("user_id", user_id) % self.partitions

    def add(self, source: int, samples: Iterable[Joined], now_ms: int) -> list[OutBatch]:
        """Buffer ``samples`` from input partition ``source``; return batches now full."""
        full: list[OutBatch] = []
        for sample in samples:
            slot = (source, self.route(sample.user_id))
            buf = self._buffers.get(slot)
            if buf is None:
                buf = self._buffers[slot] = _Buffer(now_ms)
            buf.rows.append(sample)
            if len(buf.rows) >= self.batch_size:
                full.append(self._encode(slot, self._buffers.pop(slot).rows))
        return full

    def due(self, now_ms: int) -> list[OutBatch]:
        """Batches whose first row has waited ``linger_ms`` or more."""
        ready = [s for s, b in self._buffers.items() if now_ms - b.started_ms >= self.linger_ms]
        return [self._encode(s, self._buffers.pop(s).rows) for s in ready]

    def drain(self, source: int | None = None) -> list[OutBatch]:
        """Every buffered batch (of one source partition, or of all)."""
        slots = [s for s in self._buffers if source is None or s[0] == source]
        return [self._encode(s, self._buffers.pop(s).rows) for s in slots]

    @property
    def buffered(self) -> int:
        """Rows waiting in buffers."""
        return sum(len(b.rows) for b in self._buffers.values())

    def _encode(self, slot: tuple[int, int], rows: Sequence[Joined]) -> OutBatch:
        batch = from_rows(
            self.slots,
            [r.label for r in rows],
            [r.ids for r in rows],
            [r.event_time for r in rows],
            weights=[r.weight for r in rows],
        )
        headers = [
            (HEADER_SOURCE, str(slot[0]).encode()),
            (HEADER_KEYS, np.array([r.key_hash for r in rows], dtype="<u8").tobytes()),
            (HEADER_KINDS, np.array([int(r.kind) for r in rows], dtype=np.uint8).tobytes()),
        ]
        return OutBatch(slot[0], slot[1], encode_batch(batch), headers, len(rows))


def parse_headers(
    headers: Iterable[tuple[str, bytes | None]] | None,
) -> tuple[int, npt.NDArray[np.uint64], npt.NDArray[np.uint8]] | None:
    """(source partition, key hashes, kinds) of a joiner message; None for others."""
    found = {name: value for name, value in headers or () if value is not None}
    if not {HEADER_SOURCE, HEADER_KEYS, HEADER_KINDS} <= found.keys():
        return None
    keys = np.frombuffer(found[HEADER_KEYS], dtype="<u8").astype(np.uint64)
    kinds = np.frombuffer(found[HEADER_KINDS], dtype=np.uint8)
    if len(keys) != len(kinds):
        return None
    return int(found[HEADER_SOURCE]), keys, kinds
