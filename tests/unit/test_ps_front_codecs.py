"""Key layout, sharding, grad-stream entries and dense blobs (pure logic)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.ps.dense import pack_tensors, unpack_tensors
from pipeline.ps.gradstream import Push, StreamEntryError, decode_push, encode_push, stream_id_tuple
from pipeline.ps.keys import ShardKeys, row_bytes, shard_of, split_by_shard
from pipeline.ps.pullview import decode_rows

pytestmark = pytest.mark.unit

u64 = hnp.arrays(np.uint64, st.integers(0, 300), elements=st.integers(0, 2**64 - 1))


def test_shard_assignment_is_stable_and_balanced() -> None:
    # Known values pin the function: a change would silently move every row to another shard.
    ids = np.array([0, 1, 2, 2**64 - 1], dtype=np.uint64)
    assert shard_of(ids, 1000).tolist() == shard_of(ids.copy(), 1000).tolist()
    expected = [int(x) % 1000 for x in _splitmix_reference(ids)]
    assert shard_of(ids, 1000).tolist() == expected
    counts = np.bincount(shard_of(np.arange(100_000, dtype=np.uint64), 8), minlength=8)
    assert counts.min() > 0.95 * 100_000 / 8


def _splitmix_reference(ids: np.ndarray) -> list[int]:
    """SplitMix64 finalizer written with Python ints (the published constants)."""
    out, mask = [], (1 << 64) - 1
    for x in ids.tolist():
        z = (x + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


@given(u64, st.integers(1, 16))
def test_split_by_shard_partitions_positions(ids: np.ndarray, shards: int) -> None:
    parts = split_by_shard(ids, shards)
    assert len(parts) == shards
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(ids)))
    for s, pos in enumerate(parts):
        assert (shard_of(ids[pos], shards) == s).all()


@given(u64)
def test_pull_keys_roundtrip_and_carry_hash_tag(ids: np.ndarray) -> None:
    keys = ShardKeys("deep", 3)
    names = keys.pull_keys(ids)
    assert all(n.startswith(b"pv:{deep:3}:") and len(n) == len(keys.pull_prefix) + 8 for n in names)
    assert [keys.id_of_key(n) for n in names] == ids.tolist()


def test_table_names_that_break_hash_tags_are_refused() -> None:
    for bad in ("", "a{b", "a:b", "a}b", "a b"):
        with pytest.raises(ValueError):
            ShardKeys(bad, 0)


def test_row_bytes_keep_trailing_zero_bytes() -> None:
    rows = np.array([[1.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    packed = row_bytes(rows)
    assert [len(b) for b in packed] == [8, 8]
    weights, found = decode_rows([packed[0], None, packed[1]], 2)
    assert found.tolist() == [True, False, True]
    assert np.array_equal(weights, [[1, 0], [0, 0], [0, 0]])


def test_decode_rows_rejects_wrong_value_size() -> None:
    with pytest.raises(ValueError, match="value 1 has 4 bytes, expected 8"):
        decode_rows([b"\0" * 8, b"\0" * 4], 2)


@given(
    n=st.integers(0, 50),
    dim=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["grad", "delta"]),
)
def test_push_entry_roundtrip(n: int, dim: int, seed: int, kind: str) -> None:
    rng = np.random.default_rng(seed)
    push = Push(
        kind,
        "t1",
        7,
        rng.integers(0, 2**63, n).astype(np.uint64),
        rng.normal(size=(n, dim)).astype(np.float32),
        rng.random(n).astype(np.float32),
        rng.random(n).astype(np.float32),
        123,
        {"samples": {"0": 5}},
    )
    back = decode_push(encode_push(push), dim)
    assert (back.kind, back.trainer, back.seq, back.max_event_time) == (kind, "t1", 7, 123)
    assert back.offsets == {"samples": {"0": 5}}
    for name in ("ids", "values", "shows", "clicks"):
        assert np.array_equal(getattr(back, name), getattr(push, name))


def _entry(n: int = 3, dim: int = 2) -> dict[bytes, bytes]:
    z = np.zeros(n, np.float32)
    return encode_push(
        Push("grad", "t", 1, np.arange(n, dtype=np.uint64), np.ones((n, dim), np.float32), z, z)
    )


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda f: f.update({b"h": b"{not json"}), "bad_header"),
        (lambda f: f.pop(b"h"), "bad_header"),
        (lambda f: f.update({b"i": f[b"i"][:-1]}), "length_mismatch"),
        (lambda f: f.update({b"v": f[b"v"] + b"\0\0\0\0"}), "length_mismatch"),
        (lambda f: f.update({b"v": np.full(6, np.nan, "<f4").tobytes()}), "non_finite"),
        (lambda f: f.update({b"s": np.full(3, -1, "<f4").tobytes()}), "negative_counts"),
        (lambda f: f.update({b"h": f[b"h"].replace(b'"grad"', b'"bogus"')}), "bad_kind"),
    ],
)
def test_corrupt_entries_are_rejected_with_a_reason(mutate: object, reason: str) -> None:
    fields = _entry()
    mutate(fields)  # type: ignore[operator]
    with pytest.raises(StreamEntryError) as info:
        decode_push(fields, 2)
    assert info.value.reason == reason


def test_wrong_dim_is_rejected() -> None:
    with pytest.raises(StreamEntryError) as info:
        decode_push(_entry(dim=2), 4)
    assert info.value.reason == "wrong_dim"


def test_stream_ids_order_numerically() -> None:
    assert stream_id_tuple(b"9-30") < stream_id_tuple(b"10-2")
    assert stream_id_tuple(b"10-2") < stream_id_tuple(b"10-10")


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        hnp.arrays(
            np.float32,
            hnp.array_shapes(min_dims=1, max_dims=3, max_side=4),
            elements=st.floats(-1e6, 1e6, width=32),
        ),
        max_size=4,
    )
)
def test_dense_blob_roundtrip(tensors: dict[str, np.ndarray]) -> None:
    back = unpack_tensors(pack_tensors(tensors))
    assert list(back) == list(tensors)
    for name, value in tensors.items():
        assert np.array_equal(back[name], value)


def test_truncated_dense_blob_is_rejected() -> None:
    blob = pack_tensors({"w": np.ones((2, 2), np.float32)})
    with pytest.raises(ValueError, match="truncated"):
        unpack_tensors(blob[:-1])
    with pytest.raises(ValueError, match="trailing"):
        unpack_tensors(blob + b"x")


@given(u64.filter(len))
def test_raw_mget_command_equals_redis_py_packing(ids: np.ndarray) -> None:
    from redis.connection import PythonRespSerializer

    keys = ShardKeys("wide", 12)
    packed = PythonRespSerializer(65536, lambda x: x).pack("MGET", *keys.pull_keys(ids))
    assert keys.mget_command(ids) == b"".join(packed)


@given(u64.filter(len), st.integers(1, 17), st.integers(0, 2**32 - 1))
def test_raw_mset_command_equals_redis_py_packing(ids: np.ndarray, dim: int, seed: int) -> None:
    from redis.connection import PythonRespSerializer

    keys = ShardKeys("deep", 3)
    rows = np.random.default_rng(seed).standard_normal((len(ids), dim)).astype(np.float32)
    args = [x for pair in zip(keys.pull_keys(ids), row_bytes(rows), strict=True) for x in pair]
    packed = PythonRespSerializer(65536, lambda x: x).pack("MSET", *args)
    assert keys.mset_command(ids, rows) == b"".join(packed)
