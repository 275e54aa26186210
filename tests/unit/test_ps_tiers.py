"""Cold-tier contract suite, run here against MemoryTier.

``TierContract`` is the one suite every :class:`ColdTier` must pass; the SSD tier
runs it in ``tests/integration/test_ps_ssd_tier.py`` by subclassing it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.ps.tiers import ColdTier, MemoryTier

pytestmark = pytest.mark.unit

WIDTH = 5
EDGE = np.array([0, 1, 2**63, 2**64 - 1], dtype=np.uint64)


def rows_for(ids: np.ndarray, salt: float = 0.0) -> np.ndarray:
    """Rows that encode their id, so mix-ups are visible."""
    base = (ids % np.uint64(1_000_003)).astype(np.float32)[:, None]
    return base + np.arange(WIDTH, dtype=np.float32)[None, :] * 0.5 + np.float32(salt)


class TierContract:
    """Behaviour every cold tier shares; subclasses provide ``tier`` and ``reopen``."""

    @pytest.fixture
    def tier(self, tmp_path: Path) -> Iterator[ColdTier]:
        raise NotImplementedError

    def reopen(self, path: Path) -> ColdTier:
        """Open a checkpoint directory written by ``tier.checkpoint(path)``."""
        raise NotImplementedError

    def test_put_get_round_trip_with_edge_ids(self, tier: ColdTier) -> None:
        tier.put(EDGE, rows_for(EDGE))
        ids = np.concatenate([EDGE[::-1], np.array([42], np.uint64)])
        found, rows = tier.get(ids)
        assert found.tolist() == [True] * 4 + [False]
        np.testing.assert_array_equal(rows[:4], rows_for(EDGE[::-1]))
        assert not rows[4].any() and rows.dtype == np.float32
        assert tier.count() == len(tier) == 4

    def test_upsert_and_duplicates_last_wins(self, tier: ColdTier) -> None:
        ids = np.array([7, 8], np.uint64)
        tier.put(ids, rows_for(ids))
        dup = np.array([8, 9, 8], np.uint64)
        new_rows = rows_for(dup, salt=100.0)
        new_rows[2] += 1000.0
        tier.put(dup, new_rows)
        found, rows = tier.get(np.array([7, 8, 9], np.uint64))
        assert found.all() and tier.count() == 3
        np.testing.assert_array_equal(rows[1], new_rows[2])
        np.testing.assert_array_equal(rows[2], new_rows[1])

    def test_delete_and_pop(self, tier: ColdTier) -> None:
        ids = np.arange(10, dtype=np.uint64)
        tier.put(ids, rows_for(ids))
        tier.delete(np.array([3, 3, 100], np.uint64))  # duplicates and missing are fine
        assert tier.count() == 9
        found, rows = tier.pop(np.array([4, 3, 5], np.uint64))
        assert found.tolist() == [True, False, True]
        np.testing.assert_array_equal(rows[[0, 2]], rows_for(np.array([4, 5], np.uint64)))
        assert tier.count() == 7
        assert not tier.get(np.array([4, 5], np.uint64))[0].any()

    def test_empty_batches(self, tier: ColdTier) -> None:
        empty = np.zeros(0, np.uint64)
        tier.put(empty, np.zeros((0, WIDTH), np.float32))
        found, rows = tier.get(empty)
        assert found.shape == (0,) and rows.shape == (0, WIDTH)
        tier.delete(empty)
        assert tier.count() == 0 and list(tier.iter_chunks()) == []

    def test_random_ops_match_dict_model(self, tier: ColdTier) -> None:
        rng = np.random.default_rng(11)
        model: dict[int, np.ndarray] = {}
        for step in range(40):
            ids = rng.integers(0, 60, rng.integers(0, 30)).astype(np.uint64)
            if rng.random() < 0.6:
                rows = rows_for(ids, salt=float(step))
                tier.put(ids, rows)
                model.update(zip(ids.tolist(), rows, strict=True))
            else:
                tier.delete(ids)
                for i in ids.tolist():
                    model.pop(i, None)
            assert tier.count() == len(model)
        probe = np.arange(60, dtype=np.uint64)
        found, rows = tier.get(probe)
        for i, ok, row in zip(probe.tolist(), found, rows, strict=True):
            assert ok == (i in model)
            if ok:
                np.testing.assert_array_equal(row, model[i])

    @pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
    def test_iter_chunks_covers_every_row_once(self, tier: ColdTier, chunk_rows: int) -> None:
        ids = np.concatenate([EDGE, np.arange(10, 60, dtype=np.uint64)])
        tier.put(ids, rows_for(ids))
        seen: list[int] = []
        for chunk_ids, chunk_rows_ in tier.iter_chunks(chunk_rows):
            assert chunk_ids.dtype == np.uint64 and chunk_ids.shape[0] <= chunk_rows
            np.testing.assert_array_equal(chunk_rows_, rows_for(chunk_ids))
            seen.extend(chunk_ids.tolist())
        assert sorted(seen) == sorted(ids.tolist())

    def test_mutation_while_iterating(self, tier: ColdTier) -> None:
        ids = np.arange(100, dtype=np.uint64)
        tier.put(ids, rows_for(ids))
        visited = 0
        for chunk_ids, rows in tier.iter_chunks(16):
            visited += chunk_ids.shape[0]
            tier.put(chunk_ids, rows + 1.0)  # what shrink does: write back ...
            tier.delete(chunk_ids[chunk_ids % 2 == 0])  # ... and delete some
        assert visited == 100 and tier.count() == 50
        found, rows = tier.get(np.array([1, 99], np.uint64))
        assert found.all()
        np.testing.assert_array_equal(rows, rows_for(np.array([1, 99], np.uint64)) + 1.0)

    def test_checkpoint_is_a_consistent_copy(self, tier: ColdTier, tmp_path: Path) -> None:
        ids = np.arange(1000, dtype=np.uint64)
        tier.put(ids, rows_for(ids))
        tier.checkpoint(tmp_path / "ckpt")
        tier.put(ids[:10], rows_for(ids[:10], salt=5.0))  # later writes stay out of the copy
        tier.delete(ids[10:20])
        copy = self.reopen(tmp_path / "ckpt")
        try:
            assert copy.count() == 1000
            found, rows = copy.get(ids)
            assert found.all()
            np.testing.assert_array_equal(rows, rows_for(ids))
        finally:
            copy.close()

    def test_restore_replaces_every_row_with_a_checkpoint(
        self, tier: ColdTier, tmp_path: Path
    ) -> None:
        ids = np.arange(500, dtype=np.uint64)
        tier.put(ids, rows_for(ids))
        for _ in range(1000):  # a store may need a few calls (background flush)
            if tier.prepare_checkpoint():
                break
        tier.checkpoint(tmp_path / "ckpt")
        tier.put(ids[:10], rows_for(ids[:10], salt=5.0))
        tier.delete(ids[10:20])
        tier.put(np.array([10_000], np.uint64), rows_for(np.array([10_000], np.uint64)))
        tier.restore(tmp_path / "ckpt")
        assert tier.count() == 500
        found, rows = tier.get(np.concatenate([ids, np.array([10_000], np.uint64)]))
        assert found[:500].all() and not found[500]
        np.testing.assert_array_equal(rows[:500], rows_for(ids))
        tier.put(ids[:5], rows_for(ids[:5], salt=1.0))  # the restored tier is writable ...
        tier.restore(tmp_path / "ckpt")  # ... and the checkpoint was left as it was
        np.testing.assert_array_equal(tier.get(ids[:5])[1], rows_for(ids[:5]))

    def test_rejects_malformed_input(self, tier: ColdTier) -> None:
        with pytest.raises(ValueError):
            tier.put(np.array([1], np.int64), np.zeros((1, WIDTH), np.float32))  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            tier.put(np.array([1], np.uint64), np.zeros((1, WIDTH + 1), np.float32))
        with pytest.raises(ValueError):
            tier.put(np.array([1], np.uint64), np.zeros((1, WIDTH), np.float64))  # type: ignore[arg-type]


class TestMemoryTier(TierContract):
    @pytest.fixture
    def tier(self, tmp_path: Path) -> Iterator[ColdTier]:
        with MemoryTier(WIDTH, capacity=4) as t:  # tiny capacity: exercises growth
            yield t

    def reopen(self, path: Path) -> ColdTier:
        return MemoryTier.load(path)
