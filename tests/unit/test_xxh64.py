"""Vectorized XXH64 (pipeline.codec.xxh64) against the xxhash package."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

from pipeline.codec.xxh64 import xxh64_ranges

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("seed", [0, 1, 2**64 - 1, 12345678901234567890])
def test_every_length_and_alignment_matches_the_reference(seed: int) -> None:
    rng = np.random.default_rng(seed % 1000)
    # lengths 0..130 cover every tail (8-, 4-, 1-byte) and several 32-byte stripes
    strings = [bytes(rng.integers(0, 256, n, dtype=np.uint8)) for n in range(131) for _ in range(3)]
    rng.shuffle(strings)  # type: ignore[arg-type]
    buf = b"".join(strings)
    lengths = np.array([len(s) for s in strings])
    starts = np.cumsum(lengths) - lengths  # every alignment mod 8 occurs
    got = xxh64_ranges(buf, starts, lengths, seed)
    assert got.dtype == np.uint64
    assert got.tolist() == [xxhash.xxh64_intdigest(s, seed) for s in strings]


def test_ranges_may_overlap_and_repeat() -> None:
    buf = b"user_id\x1fu42 and more"
    starts, lengths = [0, 0, 8, 3], [11, 11, 3, 0]
    got = xxh64_ranges(np.frombuffer(buf, dtype=np.uint8), starts, lengths)
    assert got.tolist() == [
        xxhash.xxh64_intdigest(buf[s : s + n]) for s, n in zip(starts, lengths, strict=True)
    ]


def test_no_ranges() -> None:
    assert xxh64_ranges(b"", [], []).tolist() == []
