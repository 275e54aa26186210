"""What the join emits: labelled samples, orphan clicks, counters, and the key hashes.

The key hash and the downsampling draw are part of the contract (they are in the
``samples`` headers and decide which negatives exist), so they are spelled out here
and in ``docs/joiner.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import IntEnum

import xxhash

from pipeline.joiner.records import Click, JoinKey, Origin, key_bytes

__all__ = [
    "NEGATIVE_SEED",
    "Counters",
    "Joined",
    "Kind",
    "OrphanClick",
    "Output",
    "join_key_hash",
    "keep_negative",
]

NEGATIVE_SEED = 1  # xxh64 seed of the downsampling draw (seed 0 is the key hash)


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


@dataclass(frozen=True)
class Joined:
    """A labelled sample ready for batching."""

    key: JoinKey
    key_hash: int
    user_id: str
    kind: Kind
    label: float
    weight: float
    event_time: int  # the impression's event time
    ids: Mapping[str, int]


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
