"""Chunk payloads, checksums, splitting, publish requests and the subscriber's row merge."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.ps.staging.chunks import (
    ChunkError,
    checksum,
    pack_ids,
    pack_rows,
    split_bytes,
    split_ids,
    split_rows,
    unpack_ids,
    unpack_rows,
    verify,
)
from pipeline.ps.staging.requests import PublishRequest
from pipeline.publish.subscriber import merge_rows

pytestmark = pytest.mark.unit


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 300), dim=st.integers(1, 9), fp16=st.booleans(), seed=st.integers(0, 99))
def test_rows_round_trip_through_size_bounded_chunks(
    n: int, dim: int, fp16: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 2**64, n, dtype=np.uint64)
    weights = rng.normal(size=(n, dim)).astype(np.float32)
    max_bytes = 17 + (8 + dim * 4) * 7 + 3
    pieces = list(split_rows(ids, weights, fp16=fp16, max_bytes=max_bytes))
    assert all(len(p) <= max_bytes for p in pieces)
    assert len(pieces) == -(-n // len(unpack_rows(pieces[0])[0])) if n else not pieces
    got = [unpack_rows(p) for p in pieces]
    got_ids = np.concatenate([g[0] for g in got]) if got else np.zeros(0, np.uint64)
    np.testing.assert_array_equal(got_ids, ids)
    if n:
        got_w = np.concatenate([g[1] for g in got])
        expected = weights.astype(np.float16) if fp16 else weights
        assert got_w.dtype == expected.dtype
        np.testing.assert_array_equal(got_w, expected)  # bit-exact


def test_tombstones_round_trip_and_split() -> None:
    ids = np.arange(1000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    pieces = list(split_ids(ids, max_bytes=12 + 8 * 100))
    assert len(pieces) == 10
    np.testing.assert_array_equal(np.concatenate([unpack_ids(p) for p in pieces]), ids)
    assert unpack_ids(pack_ids(np.zeros(0, np.uint64))).shape == (0,)


def test_checksum_detects_any_flipped_byte() -> None:
    payload = pack_rows(np.array([1, 2], np.uint64), np.ones((2, 3), np.float32), fp16=False)
    digest = checksum(payload)
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    verify(payload, digest)
    for pos in (0, len(payload) // 2, len(payload) - 1):
        bad = bytearray(payload)
        bad[pos] ^= 0x01
        with pytest.raises(ChunkError, match="checksum mismatch"):
            verify(bytes(bad), digest)
    with pytest.raises(ChunkError, match="algorithm"):
        verify(payload, "md5:00")


@pytest.mark.parametrize("cut", [1, 5, 20])
def test_truncated_payloads_are_rejected(cut: int) -> None:
    rows = pack_rows(np.array([1, 2], np.uint64), np.ones((2, 3), np.float32), fp16=False)
    with pytest.raises(ChunkError):
        unpack_rows(rows[:-cut])
    with pytest.raises(ChunkError):
        unpack_ids(pack_ids(np.array([1, 2], np.uint64))[:-cut])
    with pytest.raises(ChunkError):
        unpack_ids(rows)  # wrong kind of payload


def test_split_bytes_covers_the_blob() -> None:
    blob = bytes(range(256)) * 5
    pieces = split_bytes(blob, 300)
    assert [len(p) for p in pieces] == [300, 300, 300, 300, 80]
    assert b"".join(pieces) == blob
    assert split_bytes(b"", 10) == [b""]
    with pytest.raises(ValueError, match="cannot hold one row"):
        list(
            split_rows(
                np.ones(1, np.uint64), np.ones((1, 64), np.float32), fp16=False, max_bytes=64
            )
        )


def test_publish_request_round_trips_through_a_barrier_name() -> None:
    for req in (PublishRequest("ctr", 7, None, 6, 4096), PublishRequest("m", 2, 1, None, 64)):
        assert PublishRequest.parse(req.barrier_name()) == req
    with pytest.raises(ValueError):
        PublishRequest.parse("publish:ctr:1:2")
    with pytest.raises(ValueError):
        PublishRequest.parse("snapshot-3")


def test_merge_rows_matches_a_dict_reference() -> None:
    rng = np.random.default_rng(3)
    ref: dict[int, np.ndarray] = {}
    ids, w = np.zeros(0, np.uint64), np.zeros((0, 2), np.float32)
    for _ in range(20):
        up = np.unique(rng.integers(0, 60, 15).astype(np.uint64))
        up_w = rng.normal(size=(len(up), 2)).astype(np.float32)
        dead = np.setdiff1d(rng.integers(0, 60, 5).astype(np.uint64), up)
        ids, w = merge_rows((ids, w), (up, up_w), dead)
        for i, row in zip(up.tolist(), up_w, strict=True):
            ref[i] = row
        for i in dead.tolist():
            ref.pop(i, None)
    assert ids.tolist() == sorted(ref)
    np.testing.assert_array_equal(w, np.stack([ref[i] for i in sorted(ref)]))


@pytest.mark.parametrize("seed", range(5))
def test_merge_rows_any_order_overlaps_and_dtypes_and_leaves_live_alone(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref: dict[int, np.ndarray] = {}
    ids, w = np.zeros(0, np.uint64), np.zeros((0, 3), np.float32)
    for step in range(30):
        up = rng.permutation(np.unique(rng.integers(0, 200, 40).astype(np.uint64)))  # shards
        dtype = np.float16 if step % 7 == 6 else np.float32
        up_w = rng.normal(size=(len(up), 3)).astype(dtype)
        dead = np.unique(rng.integers(0, 260, 12).astype(np.uint64))  # absent or upserted too
        before_ids, before_w = ids.copy(), w.copy()
        new_ids, new_w = merge_rows((ids, w), (up, up_w), dead)
        np.testing.assert_array_equal(ids, before_ids)  # the live version is untouched
        np.testing.assert_array_equal(w, before_w)
        for i in np.setdiff1d(dead, up).tolist():
            ref.pop(i, None)
        for i, row in zip(up.tolist(), up_w, strict=True):
            ref[i] = row
        ref = {i: row.astype(dtype) for i, row in ref.items()}  # the whole table takes dtype
        assert new_ids.tolist() == sorted(ref) and new_w.dtype == dtype
        np.testing.assert_array_equal(new_w, np.stack([ref[i] for i in sorted(ref)]).astype(dtype))
        ids, w = new_ids, new_w
