"""Stable 64-bit feature ids: ``id = hash64(slot, raw value)``.

Training, serving and any other language must hash identically, so the algorithm is
fixed (``HASH_VERSION`` 1) and spelled out here and in ``docs/hashing.md``:

1. ``value_bytes``: a ``str`` is encoded as UTF-8; an ``int`` as its decimal ASCII form
   (``-12`` -> ``b"-12"``, so ``hash64("C1", 5) == hash64("C1", "5")``); ``bytes`` are
   used as they are. ``bool`` and other types are rejected.
2. ``key = slot.encode("utf-8") + b"\\x1f" + value_bytes`` (0x1F is the ASCII unit
   separator; slot names must not contain it, so keys are unambiguous).
3. ``id = XXH64(key, seed=0)``, read as an unsigned 64-bit integer.

Avro has no unsigned long, so ids travel as two's-complement ``long``:
:func:`to_signed` / :func:`to_unsigned` convert arrays (zero-copy views) and
:func:`to_signed_int` / :func:`to_unsigned_int` convert single values.
"""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

__all__ = [
    "HASH_SEED",
    "HASH_VERSION",
    "SEPARATOR",
    "hash64",
    "hash64_many",
    "to_signed",
    "to_signed_int",
    "to_unsigned",
    "to_unsigned_int",
    "value_bytes",
]

HASH_VERSION = 1
HASH_SEED = 0
SEPARATOR = b"\x1f"

RawValue = str | int | bytes | np.integer[Any]

_U64 = 1 << 64
_I64_MIN = -(1 << 63)


def value_bytes(raw_value: RawValue) -> bytes:
    """Canonical bytes of a raw feature value (step 1 of the algorithm)."""
    if isinstance(raw_value, str):
        return raw_value.encode("utf-8")
    if isinstance(raw_value, bytes):
        return raw_value
    if isinstance(raw_value, Integral) and not isinstance(raw_value, bool | np.bool_):
        return str(int(raw_value)).encode("ascii")
    raise TypeError(f"raw_value must be str, int or bytes, got {type(raw_value).__name__}")


def _slot_prefix(slot: str) -> bytes:
    """``slot`` bytes plus the separator; rejects names that would make keys ambiguous."""
    if not isinstance(slot, str) or not slot:
        raise ValueError(f"slot must be a non-empty str, got {slot!r}")
    prefix = slot.encode("utf-8")
    if SEPARATOR in prefix:
        raise ValueError(f"slot {slot!r} must not contain the separator 0x1F")
    return prefix + SEPARATOR


def hash64(slot: str, raw_value: RawValue) -> int:
    """The uint64 feature id of ``raw_value`` in ``slot``."""
    return xxhash.xxh64_intdigest(_slot_prefix(slot) + value_bytes(raw_value), HASH_SEED)


def hash64_many(slot: str, values: Iterable[RawValue]) -> npt.NDArray[np.uint64]:
    """:func:`hash64` of each value of one slot, as a uint64 array."""
    prefix = _slot_prefix(slot)
    digest = xxhash.xxh64_intdigest
    # uint64 from Python ints >= 2**63 is fine for np.fromiter with an explicit dtype.
    return np.fromiter(
        (digest(prefix + value_bytes(v), HASH_SEED) for v in values), dtype=np.uint64
    )


def to_signed(ids: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """uint64 ids as int64 (two's complement), a view when given a uint64 array."""
    arr = _as_array(ids, np.uint64)
    return arr.view(np.int64)


def to_unsigned(ids: npt.ArrayLike) -> npt.NDArray[np.uint64]:
    """int64 (two's complement, e.g. Avro longs) as uint64 ids, a view when possible."""
    arr = _as_array(ids, np.int64)
    return arr.view(np.uint64)


def _as_array(values: npt.ArrayLike, dtype: type[np.generic]) -> npt.NDArray[np.generic]:
    """``values`` as an array of exactly ``dtype``; refuses silent casts of other arrays."""
    if isinstance(values, np.ndarray):
        if values.dtype != np.dtype(dtype):  # also rejects non-native byte order
            raise TypeError(f"expected a {np.dtype(dtype)} array, got {values.dtype}")
        return values
    return np.asarray(values, dtype=dtype)


def to_signed_int(value: int) -> int:
    """One uint64 value as the int64 with the same bits."""
    if not 0 <= value < _U64:
        raise ValueError(f"{value} is outside the uint64 range")
    return value - _U64 if value >= 1 << 63 else value


def to_unsigned_int(value: int) -> int:
    """One int64 value as the uint64 with the same bits."""
    if not _I64_MIN <= value < 1 << 63:
        raise ValueError(f"{value} is outside the int64 range")
    return value + _U64 if value < 0 else value
