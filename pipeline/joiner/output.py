"""Batching joined samples into columnar ``SampleBatch`` messages for ``samples``.

Samples are routed by user id (``hash64("user_id", user) % partitions``), so all of a
user's samples reach the same trainer partition in order, and buffered per
(source partition, output partition) until ``batch_size`` rows or ``linger_ms``.
Buffers hold column chunks (:class:`~pipeline.joiner.results.Samples`), never a
Python object per row; a full batch is sliced out and encoded with a few numpy
calls. Every message carries headers naming its source partition and, per row, the
join key hash and :class:`~pipeline.joiner.results.Kind`: that is what lets a
restarted joiner recognise samples it already emitted (see ``docs/joiner.md``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pipeline.codec.hashing import hash64
from pipeline.codec.samplebatch import SampleBatch, encode_batch
from pipeline.codec.slots import SlotConfig
from pipeline.joiner.results import Samples

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
    chunks: list[Samples] = field(default_factory=list)
    rows: int = 0


class SampleBatcher:
    """Count/linger batching of joined samples, per source and output partition."""

    def __init__(
        self,
        slots: SlotConfig,
        partitions: int,
        batch_size: int,
        linger_ms: int,
        negative_rate: float = 1.0,
    ) -> None:
        if partitions < 1 or batch_size < 1 or linger_ms < 0:
            raise ValueError("partitions and batch_size must be >= 1, linger_ms >= 0")
        self.slots = slots
        self.partitions = partitions
        self.batch_size = batch_size
        self.linger_ms = linger_ms
        self.negative_rate = negative_rate
        self._buffers: dict[tuple[int, int], _Buffer] = {}

    def route(self, user_id: str) -> int:
        """Output partition of a user's samples."""
        return hash64("user_id", user_id) % self.partitions

    def add(self, source: int, samples: Samples, now_ms: int) -> list[OutBatch]:
        """Buffer ``samples`` from input partition ``source``; return batches now full."""
        if not len(samples):
            return []
        part = (samples.user % np.uint64(self.partitions)).astype(np.int64)
        full: list[OutBatch] = []
        if self.partitions == 1:
            groups = [(0, samples)]
        else:
            order = np.argsort(part, kind="stable")
            sp = part[order]
            cuts = np.flatnonzero(sp[1:] != sp[:-1]) + 1
            bounds = [0, *cuts.tolist(), len(sp)]
            groups = [(int(sp[a]), samples.take(order[a:b])) for a, b in itertools.pairwise(bounds)]
        for q, chunk in groups:
            slot = (source, q)
            buf = self._buffers.get(slot)
            if buf is None:
                buf = self._buffers[slot] = _Buffer(now_ms)
            buf.chunks.append(chunk)
            buf.rows += len(chunk)
            if buf.rows >= self.batch_size:
                rows = Samples.concat(buf.chunks, len(self.slots.slots))
                cut = buf.rows - buf.rows % self.batch_size
                for a in range(0, cut, self.batch_size):
                    full.append(self._encode(slot, rows.take(slice(a, a + self.batch_size))))
                if cut < buf.rows:
                    buf.chunks, buf.rows = [rows.take(slice(cut, None))], buf.rows - cut
                    buf.started_ms = now_ms
                else:
                    del self._buffers[slot]
        return full

    def due(self, now_ms: int) -> list[OutBatch]:
        """Batches whose first row has waited ``linger_ms`` or more."""
        ready = [s for s, b in self._buffers.items() if now_ms - b.started_ms >= self.linger_ms]
        return [self._flush(s) for s in ready]

    def drain(self, source: int | None = None) -> list[OutBatch]:
        """Every buffered batch (of one source partition, or of all)."""
        slots = [s for s in self._buffers if source is None or s[0] == source]
        return [self._flush(s) for s in slots]

    @property
    def buffered(self) -> int:
        """Rows waiting in buffers."""
        return sum(b.rows for b in self._buffers.values())

    def _flush(self, slot: tuple[int, int]) -> OutBatch:
        buf = self._buffers.pop(slot)
        return self._encode(slot, Samples.concat(buf.chunks, len(self.slots.slots)))

    def _encode(self, slot: tuple[int, int], rows: Samples) -> OutBatch:
        n = len(rows)
        labels, weights = rows.labels_weights(self.negative_rate)
        present = rows.present
        # slot-major CSR: slot s holds the ids of rows where present[:, s], in row order
        per_row = present.T.astype(np.int64)
        offsets = np.zeros((present.shape[1], n + 1), dtype=np.int64)
        np.cumsum(per_row, axis=1, out=offsets[:, 1:])
        base = np.concatenate([[0], np.cumsum(offsets[:-1, -1])])
        ids = rows.ids.T[present.T]
        batch = SampleBatch(
            labels=labels,
            weights=weights,
            event_times=rows.time.astype(np.int64),
            slots=self.slots.slots,
            offsets=(offsets + base[:, None]).astype(np.int32),
            ids=np.ascontiguousarray(ids, dtype=np.uint64),
            dense=np.zeros((n, 0), dtype=np.float32),
            fingerprint=self.slots.fingerprint,
        )
        headers = [
            (HEADER_SOURCE, str(slot[0]).encode()),
            (HEADER_KEYS, rows.key.astype("<u8").tobytes()),
            (HEADER_KINDS, rows.kind.astype(np.uint8).tobytes()),
        ]
        return OutBatch(slot[0], slot[1], encode_batch(batch), headers, n)


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
