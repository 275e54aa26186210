"""What the join emits: labelled samples (in columns), orphan clicks, counters, key hashes.

The key hash and the downsampling draw are part of the contract (they are in the
``samples`` headers and decide which negatives exist), so they are spelled out here
and in ``docs/joiner.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import IntEnum

import numpy as np
import numpy.typing as npt
import xxhash

from pipeline.joiner.records import Click, JoinKey, Origin, key_bytes

__all__ = [
    "NEGATIVE_SEED",
    "Counters",
    "Joined",
    "Kind",
    "OrphanClick",
    "Output",
    "Samples",
    "join_key_hash",
    "keep_negative",
]

NEGATIVE_SEED = 1  # xxh64 seed of the downsampling draw (seed 0 is the key hash)

U64 = npt.NDArray[np.uint64]


class Kind(IntEnum):
    """What an emitted sample is; travels per row in the ``joiner.kinds`` header."""

    NEGATIVE = 0
    POSITIVE = 1
    CORRECTION = 2  # a late click turned into a positive after its negative went out


def join_key_hash(key: JoinKey) -> int:
    """uint64 id of a join key: XXH64(request_id 0x1F item_id, seed 0)."""
    return xxhash.xxh64_intdigest(key_bytes(key), 0)


def keep_negative(key: JoinKey, rate: float) -> bool:
    """Deterministic downsampling: keep iff XXH64(key, seed 1) / 2**64 < rate."""
    return rate >= 1.0 or xxhash.xxh64_intdigest(key_bytes(key), NEGATIVE_SEED) < rate * 2.0**64


def keep_threshold(rate: float) -> int:
    """The draw keeps a negative iff ``XXH64(key, seed 1) < keep_threshold(rate)``."""
    return min(2**64, int(rate * 2.0**64))


@dataclass
class Samples:
    """Labelled samples decided together, one entry per row (columns of equal length).

    ``user`` is ``hash64("user_id", user_id)`` (it picks the output partition);
    ``ids[r, s]`` is the id of slot ``s`` where ``present[r, s]``.
    """

    key: U64
    kind: npt.NDArray[np.uint8]
    time: npt.NDArray[np.int64]
    user: U64
    ids: U64
    present: npt.NDArray[np.bool_]

    @classmethod
    def empty(cls, num_slots: int) -> Samples:
        return cls(
            np.zeros(0, np.uint64),
            np.zeros(0, np.uint8),
            np.zeros(0, np.int64),
            np.zeros(0, np.uint64),
            np.zeros((0, num_slots), np.uint64),
            np.zeros((0, num_slots), bool),
        )

    def __len__(self) -> int:
        return len(self.key)

    @classmethod
    def concat(cls, parts: list[Samples], num_slots: int) -> Samples:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty(num_slots)
        if len(parts) == 1:
            return parts[0]
        return cls(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__)
        )

    def take(self, rows: npt.ArrayLike | slice) -> Samples:
        return Samples(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))

    def labels_weights(self, negative_rate: float) -> tuple[npt.NDArray[np.float32], ...]:
        """Label 0 and weight 1/rate for negatives; label 1, weight 1 otherwise."""
        negative = self.kind == Kind.NEGATIVE
        labels = np.where(negative, 0.0, 1.0).astype(np.float32)
        weights = np.where(negative, 1.0 / negative_rate, 1.0).astype(np.float32)
        return labels, weights


@dataclass(frozen=True)
class Joined:
    """One labelled sample, as the per-event helpers of the join return it."""

    key_hash: int
    user: int
    kind: Kind
    label: float
    weight: float
    event_time: int  # the impression's event time
    ids: dict[str, int]


@dataclass(frozen=True)
class OrphanClick:
    """A click no impression matched before the watermark passed it (dead letter)."""

    click: Click
    origin: Origin


Output = Joined | OrphanClick


@dataclass
class Counters:
    """What the join has seen and decided (restored with the state)."""

    impressions: int = 0
    clicks: int = 0
    positives: int = 0
    negatives: int = 0
    negatives_dropped: int = 0
    corrections: int = 0
    late_clicks: int = 0
    late_impressions: int = 0
    duplicate_impressions: int = 0
    duplicate_clicks: int = 0
    orphan_clicks: int = 0
    malformed: int = 0  # messages dead-lettered before the join (bad bytes or fields)
    unknown_features: int = 0
    replay_suppressed: int = 0

    def add(self, other: Counters) -> None:
        """Accumulate ``other`` into this (totals over partitions)."""
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)
