"""XXH64 of many byte strings at once, in numpy: the same digests as ``xxhash.xxh64``.

The joiner hashes several strings per event (the join key, the downsampling draw,
every feature value); one ``xxhash`` call per string costs more than the rest of the
per-event work. Here the strings are ranges ``[start, start + length)`` of one
``uint8`` buffer and every step of the algorithm runs over all of them at once, with
masks where lengths differ. The algorithm is the reference one (xxhash spec, 64-bit
variant): 32-byte stripes for inputs of 32 bytes or more, then 8-byte, 4-byte and
1-byte tails, then the avalanche. ``tests/unit/test_xxh64.py`` checks it against the
``xxhash`` package on random inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["xxh64_ranges"]

U64 = npt.NDArray[np.uint64]
_MASK = (1 << 64) - 1
_P1, _P2, _P3, _P4, _P5 = (
    11400714785074694791,
    14029467366897019727,
    1609587929392839161,
    9650029242287828579,
    2870177450012600261,
)
P1, P2, P3, P4, P5 = (np.uint64(p) for p in (_P1, _P2, _P3, _P4, _P5))
_PAD = 40  # readable zero bytes past the last range (an 8-byte read at the end)


def _rotl(x: U64, r: int) -> U64:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def _round(acc: U64, lane: U64) -> U64:
    acc = acc + lane * P2
    return _rotl(acc, 31) * P1


class _Words:
    """Little-endian 64-bit reads at arbitrary (unaligned) byte positions of a buffer."""

    def __init__(self, buf: npt.NDArray[np.uint8]) -> None:
        size = (len(buf) + _PAD) // 8 * 8
        padded = np.zeros(size, dtype=np.uint8)
        padded[: len(buf)] = buf
        self.bytes = padded
        # a uint64 starting at every byte: an overlapping view (stride 1, unaligned)
        self._at = np.ndarray(shape=(size - 7,), dtype="<u8", buffer=padded, strides=(1,))

    def u64(self, pos: npt.NDArray[np.int64]) -> U64:
        return self._at[pos]


def xxh64_ranges(
    buf: npt.NDArray[np.uint8] | bytes,
    starts: npt.ArrayLike,
    lengths: npt.ArrayLike,
    seed: int = 0,
    words: Any = None,
) -> U64:
    """XXH64(``buf[s : s + n]``, ``seed``) for every (s, n) pair, as uint64.

    ``words`` may pass a prepared reader of ``buf`` (:func:`reader`) when several
    calls hash ranges of the same buffer.
    """
    arr = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, bytes) else buf
    w: _Words = words if words is not None else _Words(arr)
    start = np.asarray(starts, dtype=np.int64)
    length = np.asarray(lengths, dtype=np.int64)
    n = len(start)
    h = np.full(n, (seed + _P5) & _MASK, dtype=np.uint64)
    big = np.flatnonzero(length >= 32)
    if len(big):
        h[big] = _stripes(w, start[big], length[big], seed)
    h += length.astype(np.uint64)
    pos = start + (length & ~31)
    rem = length & 31
    zero = np.zeros(n, dtype=np.uint64)
    for k in range(3):  # up to three 8-byte lanes
        live = rem >= 8 * (k + 1)
        if not live.any():
            break
        mixed = _rotl(h ^ _round(zero, w.u64(pos + 8 * k)), 27) * P1 + P4
        h = np.where(live, mixed, h)
    pos = pos + (rem & ~7)
    rem = rem & 7
    live = rem >= 4
    if live.any():
        word = w.u64(pos) & np.uint64(0xFFFFFFFF)
        h = np.where(live, _rotl(h ^ (word * P1), 23) * P2 + P3, h)
        pos = pos + (live << 2)
        rem = rem - (live << 2)
    for k in range(3):  # up to three single bytes
        live = rem > k
        if not live.any():
            break
        byte = w.bytes[pos + k].astype(np.uint64)
        h = np.where(live, _rotl(h ^ (byte * P5), 11) * P1, h)
    h ^= h >> np.uint64(33)
    h *= P2
    h ^= h >> np.uint64(29)
    h *= P3
    h ^= h >> np.uint64(32)
    return h


def reader(buf: npt.NDArray[np.uint8]) -> Any:
    """A prepared reader of ``buf`` to pass as ``words`` to several :func:`xxh64_ranges`."""
    return _Words(buf)


def _stripes(
    w: _Words, start: npt.NDArray[np.int64], length: npt.NDArray[np.int64], seed: int
) -> U64:
    """The accumulator phase for inputs of 32 bytes or more (before adding the length)."""
    m = len(start)
    v = [
        np.full(m, (seed + _P1 + _P2) & _MASK, dtype=np.uint64),
        np.full(m, (seed + _P2) & _MASK, dtype=np.uint64),
        np.full(m, seed & _MASK, dtype=np.uint64),
        np.full(m, (seed - _P1) & _MASK, dtype=np.uint64),
    ]
    stripes = length >> 5
    for s in range(int(stripes.max())):
        sel = np.flatnonzero(stripes > s)
        base = start[sel] + 32 * s
        for lane in range(4):
            v[lane][sel] = _round(v[lane][sel], w.u64(base + 8 * lane))
    h = _rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)
    for lane in range(4):
        h = (h ^ _round(np.zeros(m, dtype=np.uint64), v[lane])) * P1 + P4
    return h
