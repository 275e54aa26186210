"""Which sparse slots and how many dense features a sample stream carries.

The :attr:`SlotConfig.fingerprint` travels in every SampleBatch so a trainer can
refuse batches built for another feature layout instead of training on garbage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property, lru_cache

import xxhash

from pipeline.codec.hashing import HASH_VERSION, SEPARATOR

__all__ = ["SlotConfig", "config_fingerprint"]


@dataclass(frozen=True)
class SlotConfig:
    """Ordered slot names plus the dense feature width of a sample stream."""

    slots: tuple[str, ...]
    dense_dim: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.slots, str) or not isinstance(self.slots, tuple | list):
            raise ValueError(f"slots: expected a tuple of str, got {type(self.slots).__name__}")
        object.__setattr__(self, "slots", tuple(self.slots))
        seen: set[str] = set()
        for name in self.slots:
            if not isinstance(name, str) or not name:
                raise ValueError(f"slots: every name must be a non-empty str, got {name!r}")
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"slots: name {name!r} is not valid UTF-8") from None
            if SEPARATOR.decode() in name:
                raise ValueError(f"slots: name {name!r} must not contain 0x1F")
            if name in seen:
                raise ValueError(f"slots: duplicate name {name!r}")
            seen.add(name)
        if isinstance(self.dense_dim, bool) or not isinstance(self.dense_dim, int):
            raise ValueError(f"dense_dim: expected an int >= 0, got {self.dense_dim!r}")
        if self.dense_dim < 0:
            raise ValueError(f"dense_dim: expected an int >= 0, got {self.dense_dim}")

    @cached_property
    def fingerprint(self) -> int:
        """uint64 identifying (slots, dense_dim, hash version); see ``docs/codec.md``."""
        return config_fingerprint(self.slots, self.dense_dim)

    def index(self, slot: str) -> int:
        """Position of ``slot``; ``KeyError`` when absent."""
        try:
            return self.slots.index(slot)
        except ValueError:
            raise KeyError(slot) from None


@lru_cache(maxsize=256)
def config_fingerprint(slots: tuple[str, ...], dense_dim: int) -> int:
    """XXH64 (seed 0) of the canonical JSON of the layout; cached for the decode path.

    Canonical JSON: keys sorted, no whitespace, ASCII-escaped, e.g.
    ``{"dense_dim":13,"hash_version":1,"slots":["C1","C2"]}``.
    """
    doc = {"dense_dim": dense_dim, "hash_version": HASH_VERSION, "slots": list(slots)}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return xxhash.xxh64_intdigest(canonical.encode("ascii"), 0)
