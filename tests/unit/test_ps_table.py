"""ShardTable against a naive per-id model, tiering transparency, rejection, shrink, memory."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pipeline.ps.initializers import initialize
from pipeline.ps.optimizers import make_optimizer
from pipeline.ps.spec import TableSpec
from pipeline.ps.table import PushRejected, RejectReason, ShardTable
from pipeline.ps.tiers import MemoryTier

pytestmark = pytest.mark.unit

DIM = 4


def make_spec(kind: str = "adagrad", **accessor: Any) -> TableSpec:
    return TableSpec.from_dict(
        {
            "name": "t",
            "dim": DIM,
            "initializer": {"kind": "uniform", "scale": 0.1, "seed": 3},
            "optimizer": {"kind": kind, "lr": 0.1},
            "accessor": {"admit_threshold": 1.0, **accessor},
        }
    )


def tiered(spec: TableSpec, budget: int) -> ShardTable:
    width = ShardTable(spec).cold_width
    return ShardTable(spec, MemoryTier(width), hot_budget_rows=budget)


def random_push(rng: np.random.Generator, n: int = 256, universe: int = 400) -> tuple:
    ids = (rng.zipf(1.4, n) % universe).astype(np.uint64)
    grads = rng.normal(size=(n, DIM)).astype(np.float32)
    clicks = (rng.random(n) < 0.2).astype(np.float32)
    return ids, grads, clicks


class NaiveTable:
    """Per-id Python model of the table semantics (float64 sums, one row at a time)."""

    def __init__(self, spec: TableSpec) -> None:
        self.spec, self.opt = spec, make_optimizer(spec.optimizer)
        self.rows: dict[int, dict[str, Any]] = {}

    def push(self, ids: np.ndarray, grads: np.ndarray, clicks: np.ndarray, now: int) -> None:
        acc: dict[int, list] = {}
        for i, key in enumerate(ids.tolist()):
            a = acc.setdefault(key, [np.zeros(DIM), 0.0, 0.0])
            a[0] += grads[i]
            a[1] += 1.0
            a[2] += clicks[i]
        s = self.spec.accessor
        for key, (g, show, click) in acc.items():
            row = self.rows.setdefault(
                key, {"w": np.zeros(DIM, np.float32), "show": 0.0, "click": 0.0, "adm": False}
            )
            row["show"] += show
            row["click"] += click
            score = (row["show"] - row["click"]) * s.nonclk_coeff + row["click"] * s.clk_coeff
            if not row["adm"] and score >= s.admit_threshold:
                row["adm"] = True
                row["w"] = initialize(self.spec.initializer, np.array([key], np.uint64), DIM)[0]
                row["st"] = self.opt.init_state(1, DIM)[0]
            if row["adm"]:
                w, st = row["w"][None].copy(), row["st"][None].copy()
                self.opt.update(w, st, g[None].astype(np.float32))
                row["w"], row["st"] = w[0], st[0]


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam", "ftrl"])
def test_matches_naive_model(kind: str) -> None:
    spec = make_spec(kind)
    table, model = ShardTable(spec, initial_capacity=16), NaiveTable(spec)
    rng = np.random.default_rng(0)
    for step in range(20):
        ids, grads, clicks = random_push(rng)
        result = table.apply_push(ids, grads, clicks=clicks, now=100 + step)
        model.push(ids, grads, clicks, 100 + step)
        assert set(result.changed_ids.tolist()) == {
            k for k in set(ids.tolist()) if model.rows[k]["adm"]
        }
    probe = np.array(sorted(model.rows), dtype=np.uint64)
    found, weights = table.lookup(probe)
    assert found.tolist() == [model.rows[k]["adm"] for k in probe.tolist()]
    want = np.stack([model.rows[k]["w"] for k in probe.tolist()])
    np.testing.assert_allclose(weights, np.where(found[:, None], want, 0.0), rtol=1e-4, atol=1e-5)
    batches = list(table.export_rows())
    ids = np.concatenate([b.ids for b in batches])
    order = np.argsort(ids)
    assert ids[order].tolist() == probe.tolist()
    show, click = (
        np.concatenate([getattr(b, f) for b in batches])[order] for f in ("show", "click")
    )
    np.testing.assert_allclose(show, [model.rows[k]["show"] for k in probe.tolist()])
    np.testing.assert_allclose(click, [model.rows[k]["click"] for k in probe.tolist()])


def test_admission_gates_weights_and_first_update_applies() -> None:
    table = ShardTable(make_spec("sgd", admit_threshold=0.25), clock=lambda: 7)
    ids, g = np.array([5], np.uint64), np.ones((1, DIM), np.float32)
    r1 = table.apply_push(ids, g)  # score 0.1: stats only
    assert r1.changed_ids.size == 0 and r1.created == 1 and not table.lookup(ids)[0][0]
    table.apply_push(ids, g)  # 0.2
    r3 = table.apply_push(ids, g)  # 0.3: admitted, init then this gradient
    assert r3.admitted_ids.tolist() == [5] and r3.changed_ids.tolist() == [5]
    init = initialize(table.spec.initializer, ids, DIM)
    np.testing.assert_allclose(r3.changed_weights, init - 0.1 * g, rtol=1e-6)
    found, w = table.lookup(ids)
    assert found[0] and np.array_equal(w, r3.changed_weights)


def test_shard_count_and_order_do_not_matter() -> None:
    """One table vs three shards (id % 3), pushes replayed: identical rows (deterministic init)."""
    spec = make_spec("adagrad", admit_probability=0.5, admit_threshold=0.0)
    whole, shards = ShardTable(spec), [ShardTable(spec) for _ in range(3)]
    rng = np.random.default_rng(2)
    for step in range(10):
        ids, grads, clicks = random_push(rng)
        whole.apply_push(ids, grads, clicks=clicks, now=step)
        for s, shard in enumerate(shards):
            m = ids % np.uint64(3) == s
            shard.apply_push(ids[m], grads[m], clicks=clicks[m], now=step)
    probe = np.arange(400, dtype=np.uint64)
    found, weights = whole.lookup(probe)
    for s, shard in enumerate(shards):
        m = probe % np.uint64(3) == s
        f, w = shard.lookup(probe[m])
        np.testing.assert_array_equal(f, found[m])
        np.testing.assert_allclose(w, weights[m], rtol=1e-6)
    assert 0.3 < found.mean() < 0.7  # about half the seen ids won their admission coin


@pytest.mark.parametrize("kind", ["adagrad", "adam", "ftrl"])
def test_hot_budget_is_transparent(kind: str) -> None:
    spec = make_spec(kind)
    memory, small = ShardTable(spec), tiered(spec, budget=50)
    rng = np.random.default_rng(1)
    promoted = demoted = 0
    for step in range(25):
        ids, grads, clicks = random_push(rng)
        a = memory.apply_push(ids, grads, clicks=clicks, now=step)
        b = small.apply_push(ids, grads, clicks=clicks, now=step)
        np.testing.assert_array_equal(a.changed_ids, b.changed_ids)
        np.testing.assert_array_equal(a.changed_weights, b.changed_weights)
        promoted, demoted = promoted + b.promoted, demoted + b.demoted
        assert small.hot_rows <= 50 and len(small) == len(memory)
    assert promoted > 0 and demoted > 0
    delta_ids = np.arange(400, dtype=np.uint64)
    deltas = rng.normal(size=(400, DIM)).astype(np.float32)
    memory.apply_delta(delta_ids, deltas, now=99)
    small.apply_delta(delta_ids, deltas, now=99)
    for got, want in zip(small.lookup(delta_ids), memory.lookup(delta_ids), strict=True):
        np.testing.assert_array_equal(got, want)


def test_demotes_least_recently_seen_and_lookup_does_not_promote() -> None:
    table = tiered(make_spec(admit_threshold=0.0), budget=10)
    g = np.zeros((1, DIM), np.float32)
    for i in range(10):
        table.apply_push(np.array([i], np.uint64), g, now=100 + i)
    result = table.apply_push(np.array([10], np.uint64), g, now=200)
    assert result.demoted == 1 and table.hot_rows == 10  # budget 10, 5% slack -> demote to 10
    cold = table.cold_tier
    assert cold is not None and cold.get(np.array([0], np.uint64))[0].all()  # oldest went cold
    found, _ = table.lookup(np.array([0], np.uint64))
    assert found[0] and cold.count() == 1  # served from cold, still cold


def test_apply_delta_sums_duplicates_and_keeps_state() -> None:
    table = ShardTable(make_spec("adagrad", admit_threshold=0.0))
    ids = np.array([1, 2], np.uint64)
    table.apply_push(ids, np.ones((2, DIM), np.float32), now=1)
    before = {
        int(i): (w.copy(), s.copy())
        for b in table.export_rows()
        for i, w, s in zip(b.ids, b.weights, b.opt_state, strict=True)
    }
    deltas = np.arange(3 * DIM, dtype=np.float32).reshape(3, DIM)
    table.apply_delta(np.array([1, 1, 2], np.uint64), deltas, now=2)
    after = {
        int(i): (w, s)
        for b in table.export_rows()
        for i, w, s in zip(b.ids, b.weights, b.opt_state, strict=True)
    }
    np.testing.assert_allclose(after[1][0], before[1][0] + deltas[0] + deltas[1], rtol=1e-6)
    np.testing.assert_allclose(after[2][0], before[2][0] + deltas[2], rtol=1e-6)
    np.testing.assert_array_equal(after[1][1], before[1][1])


def test_int64_ids_are_twos_complement() -> None:
    table = ShardTable(make_spec(admit_threshold=0.0))
    table.apply_push(np.array([-1], np.int64), np.ones((1, DIM), np.float32), now=1)
    assert table.lookup(np.array([2**64 - 1], np.uint64))[0][0]


def _snapshot(table: ShardTable) -> list:
    return [
        tuple(np.copy(getattr(b, f)) for f in b.__dataclass_fields__) for b in table.export_rows()
    ]


@pytest.mark.parametrize(
    ("push", "reason"),
    [
        ({"ids": np.zeros((2, 2), np.uint64)}, RejectReason.BAD_IDS),
        ({"ids": np.array([1.0, 2.0])}, RejectReason.BAD_IDS),
        ({"grads": np.ones((3, DIM + 1), np.float32)}, RejectReason.BAD_SHAPE),
        ({"grads": np.ones((2, DIM), np.float32)}, RejectReason.LENGTH_MISMATCH),
        ({"grads": np.full((3, DIM), "x")}, RejectReason.BAD_DTYPE),
        ({"grads": np.array([[np.nan] * DIM] * 3)}, RejectReason.NON_FINITE),
        ({"grads": np.full((3, DIM), 1e300)}, RejectReason.NON_FINITE),  # inf after float32 cast
        ({"shows": np.ones(4, np.float32)}, RejectReason.LENGTH_MISMATCH),
        ({"clicks": np.array([0, -1, 0], np.float32)}, RejectReason.NEGATIVE_COUNT),
        ({"shows": np.array([0, np.inf, 0])}, RejectReason.NON_FINITE),
        ({"now": -5}, RejectReason.BAD_TIME),
        ({"now": 1.5}, RejectReason.BAD_TIME),
    ],
)
def test_rejected_push_changes_nothing(push: dict, reason: RejectReason) -> None:
    table = tiered(make_spec(admit_threshold=0.0), budget=2)
    table.apply_push(np.arange(4, dtype=np.uint64), np.ones((4, DIM), np.float32), now=5)
    before = _snapshot(table)
    args = {"ids": np.array([1, 2, 3], np.uint64), "grads": np.ones((3, DIM), np.float32), "now": 6}
    args.update(push)
    with pytest.raises(PushRejected) as info:
        table.apply_push(**args)
    assert info.value.reason is reason and isinstance(info.value, ValueError)
    after = _snapshot(table)
    assert len(before) == len(after)
    for b, a in zip(before, after, strict=True):
        for x, y in zip(b, a, strict=True):
            np.testing.assert_array_equal(x, y)


def test_shrink_decays_and_deletes_in_both_tiers() -> None:
    spec = make_spec(
        admit_threshold=0.0,
        delete_threshold=0.5,
        show_click_decay_rate=0.5,
        delete_after_unseen_days=1,
    )
    table = tiered(spec, budget=3)
    day = 86_400
    g = np.zeros((1, DIM), np.float32)
    for i in range(6):  # ids 0..5: clicked once (score 1) -> survive one decay (0.5)
        table.apply_push(np.array([i], np.uint64), g, clicks=np.ones(1), now=10 * day + i)
    table.apply_push(np.array([6], np.uint64), g, now=10 * day)  # score 0.1 -> deleted
    table.apply_push(np.array([7], np.uint64), g, clicks=np.ones(1), now=8 * day)  # stale
    assert table.hot_rows <= 3 and len(table) == 8
    deleted = table.shrink(now=10 * day + 100)
    assert deleted.tolist() == [6, 7] and len(table) == 6
    stats = {
        int(i): float(s) for b in table.export_rows() for i, s in zip(b.ids, b.show, strict=True)
    }
    assert stats == {i: 0.5 for i in range(6)}
    assert table.shrink(now=10 * day + 200).tolist() == list(range(6))  # 0.25 < 0.5


def test_hot_memory_per_row_dim16_adagrad() -> None:
    spec = TableSpec.from_dict({"name": "t", "dim": 16, "accessor": {"admit_threshold": 0}})
    table = tiered(spec, budget=50_000)
    for start in range(0, 120_000, 4096):
        ids = np.arange(start, start + 4096, dtype=np.uint64)
        table.apply_push(ids, np.zeros((4096, 16), np.float32), now=start)
    # 64 B weights + 64 B accumulator + 17 B stats + 9 B slot map + ~19-28 B index
    assert table.bytes_per_row() <= 200
    unbudgeted = ShardTable(spec)
    for start in range(0, 120_000, 4096):
        ids = np.arange(start, start + 4096, dtype=np.uint64)
        unbudgeted.apply_push(ids, np.zeros((4096, 16), np.float32), now=start)
    assert unbudgeted.bytes_per_row() <= 230  # plus up to 25 % growth slack


def test_constructor_validation() -> None:
    spec = make_spec()
    with pytest.raises(ValueError, match="cold_tier"):
        ShardTable(spec, hot_budget_rows=10)
    with pytest.raises(ValueError, match="width"):
        ShardTable(spec, MemoryTier(3))


def test_rows_of_reads_both_tiers_by_id_without_promoting() -> None:
    from pipeline.ps.staging.tracker import serving_rows

    rng = np.random.default_rng(11)
    table = tiered(make_spec(admit_threshold=2.0), budget=60)
    for now in range(30):
        ids, grads, clicks = random_push(rng)
        table.apply_push(ids, grads, clicks, now=now)
    cold = table.cold_tier
    assert cold is not None and cold.count() > 50 and table.hot_rows <= 60
    rows = {
        int(i): (b.weights[k], b.opt_state[k], b.show[k], b.admitted[k])
        for b in table.export_rows()
        for k, i in enumerate(b.ids)
    }
    asked = np.unique(rng.integers(0, 500, 300).astype(np.uint64))  # some never stored
    hot_before, cold_before = table.hot_rows, cold.count()
    got = table.rows_of(asked)
    assert (table.hot_rows, cold.count()) == (hot_before, cold_before)  # nothing promoted
    assert sorted(got.ids.tolist()) == sorted(set(asked.tolist()) & set(rows))
    for k, i in enumerate(got.ids.tolist()):
        w, st, show, admitted = rows[i]
        np.testing.assert_array_equal(got.weights[k], w)
        np.testing.assert_array_equal(got.opt_state[k], st)
        assert got.show[k] == show and got.admitted[k] == admitted
    # a delta's serving rows by id equal the full scan restricted to the same ids
    ids, weights = serving_rows(table, asked)
    all_ids, all_weights = serving_rows(table)
    keep = np.isin(all_ids, asked)
    np.testing.assert_array_equal(ids, all_ids[keep])
    np.testing.assert_array_equal(weights, all_weights[keep])
    assert 0 < len(ids) < len(got)  # some asked rows are stored but not admitted
