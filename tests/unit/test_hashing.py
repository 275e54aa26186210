"""hash64 is the documented algorithm, stable across processes, and ids round-trip Avro."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.codec.hashing import (
    hash64,
    hash64_many,
    to_signed,
    to_signed_int,
    to_unsigned,
    to_unsigned_int,
    value_bytes,
)

pytestmark = pytest.mark.unit

M64 = (1 << 64) - 1
P1, P2, P3 = 11400714785074694791, 14029467366897019727, 1609587929392839161
P4, P5 = 9650029242287828579, 2870177450012600261

# The same vectors are listed in docs/hashing.md.
VECTORS = [
    ("C1", "5", 0xD5859C33B13A99A1),
    ("C1", 5, 0xD5859C33B13A99A1),
    ("C1", "68fd1e64", 0x6CC25F8365400C55),
    ("user_id", "u_42", 0x76F883E0CDD27A25),
    ("item_id", b"\x00\xff", 0xEFC67B6A3E1CF0FB),
    ("C1", "", 0x9B363A06CC879121),
    ("query", "café", 0xE7EE66C5A097C958),
    ("I1", -3, 0xB6C4599BB2F2BB6A),
]


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & M64


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * P2) & M64, 31) * P1) & M64


def _xxh64_reference(data: bytes, seed: int = 0) -> int:
    """Plain-Python XXH64 from the xxHash spec, independent of the xxhash package."""
    n, i = len(data), 0
    if n >= 32:
        v = [(seed + P1 + P2) & M64, (seed + P2) & M64, seed, (seed - P1) & M64]
        while i + 32 <= n:
            for k in range(4):
                v[k] = _round(v[k], int.from_bytes(data[i + 8 * k : i + 8 * k + 8], "little"))
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & M64
        for k in range(4):
            h = ((h ^ _round(0, v[k])) * P1 + P4) & M64
    else:
        h = (seed + P5) & M64
    h = (h + n) & M64
    while i + 8 <= n:
        h ^= _round(0, int.from_bytes(data[i : i + 8], "little"))
        h = (_rotl(h, 27) * P1 + P4) & M64
        i += 8
    if i + 4 <= n:
        h ^= (int.from_bytes(data[i : i + 4], "little") * P1) & M64
        h = (_rotl(h, 23) * P2 + P3) & M64
        i += 4
    for byte in data[i:]:
        h ^= (byte * P5) & M64
        h = (_rotl(h, 11) * P1) & M64
    h ^= h >> 33
    h = (h * P2) & M64
    h ^= h >> 29
    h = (h * P3) & M64
    return h ^ (h >> 32)


def test_reference_matches_published_xxh64_vector() -> None:
    # XXH64("", seed 0) from the xxHash specification.
    assert _xxh64_reference(b"") == 0xEF46DB3751D8E999


@pytest.mark.parametrize(("slot", "value", "expected"), VECTORS)
def test_known_vectors(slot: str, value: str | int | bytes, expected: int) -> None:
    assert hash64(slot, value) == expected
    assert _xxh64_reference(slot.encode() + b"\x1f" + value_bytes(value)) == expected


@given(
    st.text(st.characters(exclude_characters="\x1f", exclude_categories=["Cs"]), min_size=1),
    st.binary(max_size=100),
)
def test_hash64_is_xxh64_of_the_canonical_key(slot: str, value: bytes) -> None:
    assert hash64(slot, value) == _xxh64_reference(slot.encode("utf-8") + b"\x1f" + value)


@given(st.integers(-(2**70), 2**70))
def test_int_hashes_like_its_decimal_string(value: int) -> None:
    assert hash64("C1", value) == hash64("C1", str(value))
    assert hash64("C1", value) == hash64("C1", str(value).encode())


@given(st.text())
def test_str_hashes_like_its_utf8_bytes(value: str) -> None:
    assert hash64("s", value) == hash64("s", value.encode("utf-8"))


def test_slot_is_part_of_the_key() -> None:
    assert hash64("C1", "x") != hash64("C2", "x")
    assert hash64("ab", "c") != hash64("a", "bc")


def test_numpy_integers_hash_like_python_ints() -> None:
    assert hash64("C1", np.int64(-7)) == hash64("C1", -7)
    assert hash64("C1", np.uint64(2**64 - 1)) == hash64("C1", 2**64 - 1)


@given(st.lists(st.one_of(st.text(), st.integers(), st.binary())))
def test_hash64_many_matches_hash64(values: list[str | int | bytes]) -> None:
    out = hash64_many("slot", values)
    assert out.dtype == np.uint64
    assert out.tolist() == [hash64("slot", v) for v in values]


@pytest.mark.parametrize("value", [True, 1.5, None, ["x"]])
def test_rejects_ambiguous_value_types(value: object) -> None:
    with pytest.raises(TypeError):
        hash64("C1", value)  # type: ignore[arg-type]


@pytest.mark.parametrize("slot", ["", "a\x1fb"])
def test_rejects_bad_slot_names(slot: str) -> None:
    with pytest.raises(ValueError, match="slot"):
        hash64(slot, "x")
    with pytest.raises(ValueError, match="slot"):
        hash64_many(slot, ["x"])


def test_stable_across_processes_and_hash_seeds() -> None:
    code = "from pipeline.codec.hashing import hash64; print(hash64('user_id', 'u_42'))"
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert int(out.stdout) == hash64("user_id", "u_42") == 0x76F883E0CDD27A25


@given(hnp.arrays(np.uint64, st.integers(0, 50)))
def test_signed_unsigned_array_roundtrip(ids: np.ndarray) -> None:
    signed = to_signed(ids)
    assert signed.dtype == np.int64
    assert signed.base is ids  # a view, not a copy
    assert to_unsigned(signed).tolist() == ids.tolist()
    assert signed.tolist() == [to_signed_int(int(v)) for v in ids.tolist()]


@given(st.integers(0, 2**64 - 1))
def test_signed_unsigned_scalar_roundtrip(value: int) -> None:
    signed = to_signed_int(value)
    assert -(2**63) <= signed < 2**63
    assert signed == value if value < 2**63 else signed == value - 2**64
    assert to_unsigned_int(signed) == value


def test_scalar_conversions_reject_out_of_range() -> None:
    with pytest.raises(ValueError):
        to_signed_int(-1)
    with pytest.raises(ValueError):
        to_signed_int(2**64)
    with pytest.raises(ValueError):
        to_unsigned_int(2**63)


def test_array_conversions_refuse_silent_casts() -> None:
    with pytest.raises(TypeError):
        to_signed(np.array([1], dtype=np.int64))
    with pytest.raises(TypeError):
        to_unsigned(np.array([1], dtype=np.uint64))
    assert to_unsigned([-1]).tolist() == [2**64 - 1]
