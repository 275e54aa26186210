"""Dirty tracking of ShardTable: cuts replayed on a replica rebuild the table bit for bit,
through pushes, admission, demotion to / promotion from the cold tier and shrink."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pipeline.ps.dirty import Changes, last_occurrence
from pipeline.ps.spec import TableSpec
from pipeline.ps.table import ShardTable
from pipeline.ps.tiers import MemoryTier

pytestmark = pytest.mark.unit

DIM = 4
NOW = 1_700_000_000


def make_spec(**accessor: Any) -> TableSpec:
    return TableSpec.from_dict(
        {
            "name": "t",
            "dim": DIM,
            "initializer": {"kind": "uniform", "scale": 0.1, "seed": 3},
            "optimizer": {"kind": "adam", "lr": 0.1},
            "accessor": {"admit_threshold": 1.0, **accessor},
        }
    )


def make_table(spec: TableSpec, budget: int | None) -> ShardTable:
    cold = MemoryTier(ShardTable(spec).cold_width) if budget else None
    return ShardTable(spec, cold, hot_budget_rows=budget, initial_capacity=16)


def state(table: ShardTable) -> dict[int, tuple[bytes, ...]]:
    """Every row of both tiers, bitwise, by id (tier placement is not state)."""
    out = {}
    for b in table.export_rows(chunk_rows=64):
        for i in range(len(b)):
            out[int(b.ids[i])] = (
                b.weights[i].tobytes(),
                b.opt_state[i].tobytes(),
                b.show[i].tobytes(),
                b.click[i].tobytes(),
                b.last_seen[i].tobytes(),
                b.admitted[i].tobytes(),
            )
    return out


def replay(replica: ShardTable, changes: Changes) -> None:
    if len(changes.rows):
        replica.import_rows(changes.rows)
    replica.remove(changes.deleted)


def push(table: ShardTable, rng: np.random.Generator, step: int, universe: int = 300) -> set[int]:
    n = 96
    ids = (rng.zipf(1.3, n) % universe).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    grads = rng.normal(size=(n, DIM)).astype(np.float32)
    clicks = (rng.random(n) < 0.2).astype(np.float32)
    table.apply_push(ids, grads, clicks=clicks, now=NOW + step * 3600)
    return set(ids.tolist())


def test_not_tracking_until_started() -> None:
    table = make_table(make_spec(), None)
    push(table, np.random.default_rng(0), 0)
    assert not table.tracking_changes and table.changed_rows == 0
    assert table.cut_changes() is None  # nothing says what changed: a base is needed
    assert table.tracking_changes  # ... and tracking runs from that cut on
    empty = table.cut_changes()
    assert empty is not None and len(empty) == 0


@pytest.mark.parametrize("budget", [None, 40])
def test_cuts_replayed_on_a_replica_rebuild_the_table(budget: int | None) -> None:
    """Pushes (admission, promotion, demotion) and shrink deletions between cuts; each
    cut holds at most the rows touched since the previous one."""
    spec = make_spec(show_click_decay_rate=1.0, delete_threshold=0.0, delete_after_unseen_days=1.0)
    table, replica = make_table(spec, budget), make_table(spec, budget)
    table.start_change_tracking()
    rng = np.random.default_rng(1)
    touched: set[int] = set()
    cuts = deleted = 0
    for step in range(60):
        touched |= push(table, rng, step)
        if step % 10 == 9:  # the oldest rows expire
            gone = table.shrink(now=NOW + step * 3600 + 86_400 - 5 * 3600)
            touched |= set(gone.tolist())
            deleted += len(gone)
        if step % 3 == 2:
            changes = table.cut_changes()
            assert changes is not None
            assert len(changes) <= len(touched)  # O(changed), not O(table)
            assert not set(changes.deleted.tolist()) & set(changes.rows.ids.tolist())
            replay(replica, changes)
            assert state(replica) == state(table)
            touched, cuts = set(), cuts + 1
    assert cuts == 20 and deleted > 0 and len(table) > 100
    if budget:
        assert table.cold_tier is not None and table.cold_tier.count() > len(table) // 2


def test_clean_demotion_is_not_a_change_dirty_demotion_is() -> None:
    spec = make_spec(admit_threshold=0.0)
    table = make_table(spec, 10)
    a = np.arange(1, 11, dtype=np.uint64)
    b = np.arange(11, 21, dtype=np.uint64)
    g = np.ones((10, DIM), np.float32)
    table.apply_push(a, g, now=NOW)
    table.start_change_tracking()
    table.apply_push(b, g, now=NOW + 1)  # pushes a out of memory, untouched since the cut
    assert table.hot_rows <= 10 and table.cold_tier is not None and table.cold_tier.count() >= 10
    changes = table.cut_changes()
    assert changes is not None
    assert sorted(changes.rows.ids.tolist()) == b.tolist()  # the demoted rows are not changes
    table.apply_push(a[:3], g[:3], now=NOW + 2)  # promoted back: changed
    c = np.arange(21, 31, dtype=np.uint64)
    table.apply_push(c, g, now=NOW + 3)  # demotes a[:3] again while dirty
    assert not (table._slots.lookup(a[:3]) >= 0).any()  # they are cold now
    changes = table.cut_changes()
    assert changes is not None
    assert sorted(changes.rows.ids.tolist()) == sorted(a[:3].tolist() + c.tolist())
    cold_found, cold_w = table.lookup(a[:3])
    rows = {int(i): w for i, w in zip(changes.rows.ids, changes.rows.weights, strict=True)}
    assert cold_found.all()
    np.testing.assert_array_equal(np.stack([rows[int(i)] for i in a[:3]]), cold_w)


def test_deleted_rows_are_tombstones_unless_they_came_back() -> None:
    spec = make_spec(admit_threshold=0.0)
    table = make_table(spec, 8)
    ids = np.arange(1, 21, dtype=np.uint64)
    g = np.ones((20, DIM), np.float32)
    table.apply_push(ids, g, now=NOW)
    table.start_change_tracking()
    table.remove(np.array([1, 2, 19, 20, 999], np.uint64))  # hot, cold and unknown ids
    table.apply_push(np.array([2], np.uint64), g[:1], now=NOW + 1)  # 2 is created again
    changes = table.cut_changes()
    assert changes is not None
    assert changes.deleted.tolist() == [1, 19, 20, 999]
    assert changes.rows.ids.tolist() == [2]
    assert len(table) == 17


def test_shrink_that_decays_the_cold_tier_gives_up_tracking() -> None:
    table = make_table(make_spec(admit_threshold=0.0, show_click_decay_rate=0.9), 8)
    push(table, np.random.default_rng(2), 0)
    table.start_change_tracking()
    table.shrink(now=NOW)
    assert not table.tracking_changes
    assert table.cut_changes() is None


def test_limit_gives_up_tracking() -> None:
    table = make_table(make_spec(admit_threshold=0.0), None)
    table.start_change_tracking(limit=50)
    table.apply_push(np.arange(40, dtype=np.uint64), np.ones((40, DIM), np.float32), now=NOW)
    assert table.tracking_changes and table.changed_rows == 40
    table.apply_push(np.arange(40, dtype=np.uint64), np.ones((40, DIM), np.float32), now=NOW)
    assert table.changed_rows == 40  # the same rows again cost nothing more
    table.apply_push(np.arange(40, 60, dtype=np.uint64), np.ones((20, DIM), np.float32), now=NOW)
    assert not table.tracking_changes and table.cut_changes() is None


def test_hot_rows_between_reads_live_slots_of_a_range() -> None:
    table = make_table(make_spec(admit_threshold=0.0), None)
    ids = np.arange(100, 150, dtype=np.uint64)
    table.apply_push(ids, np.ones((50, DIM), np.float32), now=NOW)
    table.remove(ids[10:20])
    end = table.hot_slot_end
    seen = np.concatenate([table.hot_rows_between(lo, lo + 7).ids for lo in range(0, end, 7)])
    assert sorted(seen.tolist()) == sorted(ids[:10].tolist() + ids[20:].tolist())


def test_last_occurrence() -> None:
    ids = np.array([5, 3, 5, 9, 3, 3], np.uint64)
    assert last_occurrence(ids).tolist() == [5, 2, 3]
    assert last_occurrence(np.zeros(0, np.uint64)).tolist() == []
