"""HashIndex and SlotMap against a Python dict model (hypothesis), including edge ids."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.ps.index import HashIndex, SlotMap

pytestmark = pytest.mark.unit

EDGE_IDS = [0, 1, 2**63, 2**64 - 1, 2**64 - 2]
ids_strategy = st.one_of(st.sampled_from(EDGE_IDS), st.integers(0, 40), st.integers(0, 2**64 - 1))
batch = st.lists(ids_strategy, max_size=60)
op = st.tuples(st.sampled_from(["insert", "delete", "lookup"]), batch)


@settings(max_examples=200, deadline=None)
@given(st.lists(op, max_size=25), st.integers(1, 64))
def test_matches_dict_model(ops: list, capacity: int) -> None:
    index = HashIndex(capacity)  # tiny capacities force growth, collisions and tombstone reuse
    model: dict[int, int] = {}
    counter = 0
    for name, ids in ops:
        arr = np.array(ids, dtype=np.uint64)
        if name == "insert":
            slots = np.arange(counter, counter + len(ids), dtype=np.int64)
            counter += len(ids)
            index.insert(arr, slots)
            model.update(zip(ids, slots.tolist(), strict=True))  # last duplicate wins
        elif name == "delete":
            removed = index.delete(arr)
            assert removed == len({i for i in ids if i in model})
            for i in ids:
                model.pop(i, None)
        expect = [model.get(i, -1) for i in ids]
        assert index.lookup(arr).tolist() == expect
        assert len(index) == len(model)
    keys, vals = index.items()
    assert dict(zip(keys.tolist(), vals.tolist(), strict=True)) == model


def test_many_rows_and_churn_keep_load_bounded() -> None:
    rng = np.random.default_rng(1)
    index = HashIndex(8)
    ids = rng.integers(0, 2**64, 100_000, dtype=np.uint64, endpoint=False)
    for start in range(0, ids.shape[0], 4096):
        chunk = ids[start : start + 4096]
        index.insert(chunk, np.arange(start, start + chunk.shape[0]))
    assert (index.lookup(ids) == np.arange(ids.shape[0])).all()
    assert 0.45 <= len(index) / index.capacity <= 0.7
    for start in range(0, 90_000, 5000):  # delete most, then re-add: tombstones must not pile up
        index.delete(ids[start : start + 5000])
    index.insert(ids[:50_000], np.arange(50_000))
    assert len(index) == 60_000
    assert (index.lookup(ids[:50_000]) == np.arange(50_000)).all()
    assert index.capacity < 200_000


def test_insert_validates_slots() -> None:
    index = HashIndex()
    with pytest.raises(ValueError):
        index.insert(np.array([1], np.uint64), np.array([-1]))
    with pytest.raises(ValueError):
        index.insert(np.array([1, 2], np.uint64), np.array([1]))


def test_slotmap_reuses_released_slots() -> None:
    sm = SlotMap(4)
    a = sm.assign(np.array([10, 20, 30], np.uint64))
    assert a.tolist() == [0, 1, 2] and sm.high_water == 3
    sm.release(np.array([1]))
    assert sm.lookup(np.array([20, 10], np.uint64)).tolist() == [-1, 0]
    b = sm.assign(np.array([40, 50, 60, 70], np.uint64))
    assert sorted(b.tolist()) == [1, 3, 4, 5] and sm.high_water == 6
    assert sm.live_slots().tolist() == [0, 1, 2, 3, 4, 5]
    assert sm.ids[sm.lookup(np.array([70, 30], np.uint64))].tolist() == [70, 30]
    assert len(sm) == 6


@pytest.mark.parametrize("batch", [1, 5, 13, 200])
def test_long_probe_chains_agree_with_a_dict_in_the_vectorized_and_scalar_walks(
    batch: int,
) -> None:
    """Chains at high load: batches above and below the scalar-tail size give one answer."""
    rng = np.random.default_rng(batch)
    index = HashIndex(64, max_load=0.9)
    model: dict[int, int] = {}
    ids = rng.choice(2**40, 3000, replace=False).astype(np.uint64)
    for start in range(0, 2000, batch):
        chunk = ids[start : start + batch]
        index.insert(chunk, np.arange(start, start + len(chunk)))
        model.update({int(i): start + k for k, i in enumerate(chunk)})
    gone = ids[:500:3]
    index.delete(gone)  # tombstones inside chains
    for i in gone:
        model.pop(int(i))
    for start in range(0, 3000, batch):
        chunk = ids[start : start + batch]
        want = [model.get(int(i), -1) for i in chunk]
        assert index.lookup(chunk).tolist() == want
