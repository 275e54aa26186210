"""Export directory: round trip through both tiers, checksums, atomicity, no pickles."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.ps.export import (
    ExportError,
    RowBatch,
    export_table,
    import_table,
    read_rows,
    write_rows,
)
from pipeline.ps.spec import TableSpec
from pipeline.ps.table import ShardTable
from pipeline.ps.tiers import MemoryTier

pytestmark = pytest.mark.unit

SPEC = TableSpec.from_dict(
    {"name": "deep", "dim": 8, "optimizer": {"kind": "adam"}, "accessor": {"admit_threshold": 0.5}}
)


def filled_table(budget: int | None = 40) -> ShardTable:
    cold = MemoryTier(ShardTable(SPEC).cold_width) if budget else None
    table = ShardTable(SPEC, cold, hot_budget_rows=budget)
    rng = np.random.default_rng(4)
    for step in range(10):
        ids = (rng.zipf(1.3, 300) % 500).astype(np.uint64)
        ids[0] = 2**64 - 1
        grads = rng.normal(size=(300, 8)).astype(np.float32)
        clicks = (rng.random(300) < 0.1).astype(np.float32)
        table.apply_push(ids, grads, clicks=clicks, now=1_700_000_000 + step)
    return table


def all_rows(table: ShardTable) -> dict[int, tuple]:
    out = {}
    for b in table.export_rows(chunk_rows=17):
        for i in range(len(b)):
            out[int(b.ids[i])] = (
                b.weights[i].tobytes(),
                b.opt_state[i].tobytes(),
                float(b.show[i]),
                float(b.click[i]),
                int(b.last_seen[i]),
                bool(b.admitted[i]),
            )
    return out


def test_round_trip_through_both_tiers(tmp_path: Path) -> None:
    table = filled_table()
    assert table.cold_tier is not None and table.cold_tier.count() > 0
    meta = export_table(table, tmp_path / "export", chunk_rows=13)
    assert meta["rows"] == len(table)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == sorted(
        [
            "ids.npy",
            "weights.npy",
            "opt_state.npy",
            "show.npy",
            "click.npy",
            "last_seen.npy",
            "admitted.npy",
            "meta.json",
        ]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp dirs left behind
    spec, state_width, rows = read_rows(tmp_path / "export")
    assert spec == SPEC and state_width == 17 and len(rows) == len(table)
    restored = ShardTable(SPEC, MemoryTier(table.cold_width), hot_budget_rows=25)
    assert import_table(restored, tmp_path / "export", chunk_rows=50) == len(table)
    assert all_rows(restored) == all_rows(table)
    assert restored.hot_rows <= 25


def test_plain_numpy_can_read_it(tmp_path: Path) -> None:
    table = filled_table(budget=None)
    export_table(table, tmp_path / "e")
    ids = np.load(tmp_path / "e" / "ids.npy", allow_pickle=False)
    weights = np.load(tmp_path / "e" / "weights.npy", allow_pickle=False)
    assert ids.dtype == np.uint64 and weights.shape == (len(table), 8)
    found, w = table.lookup(ids)
    np.testing.assert_array_equal(w[found], weights[found])


def test_corruption_is_detected(tmp_path: Path) -> None:
    export_table(filled_table(), tmp_path / "e")
    target = tmp_path / "e" / "weights.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="checksum"):
        read_rows(tmp_path / "e")


def test_meta_must_describe_the_files(tmp_path: Path) -> None:
    export_table(filled_table(), tmp_path / "e")
    meta_path = tmp_path / "e" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"]["show.npy"]["dtype"] = "|O"  # claims an object array
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="does not match"):
        read_rows(tmp_path / "e")
    meta["format"] = "something-else"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="not a"):
        read_rows(tmp_path / "e")


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    def batches() -> Iterator[RowBatch]:
        yield from filled_table().export_rows(chunk_rows=10)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_rows(tmp_path / "e", SPEC, 17, batches())
    assert list(tmp_path.iterdir()) == []


def test_existing_target_needs_overwrite(tmp_path: Path) -> None:
    table = filled_table()
    export_table(table, tmp_path / "e")
    with pytest.raises(FileExistsError):
        export_table(table, tmp_path / "e")
    export_table(table, tmp_path / "e", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["e"]
    read_rows(tmp_path / "e")


def test_import_refuses_other_shapes(tmp_path: Path) -> None:
    export_table(filled_table(), tmp_path / "e")
    other = ShardTable(
        TableSpec.from_dict({"name": "deep", "dim": 8, "optimizer": {"kind": "sgd"}})
    )
    with pytest.raises(ExportError, match="does not fit"):
        import_table(other, tmp_path / "e")


def test_deleted_ids_and_info_of_a_delta(tmp_path: Path) -> None:
    from pipeline.ps.export import read_deleted, read_meta

    table = filled_table(budget=None)
    batch = next(table.export_rows(chunk_rows=5))
    gone = np.array([2**64 - 1, 0, 7], np.uint64)
    write_rows(tmp_path / "d", SPEC, table.state_width, [batch], deleted=gone, info={"cut": 3})
    assert read_deleted(tmp_path / "d").tolist() == gone.tolist()
    assert read_meta(tmp_path / "d")["info"] == {"cut": 3}
    _, _, rows = read_rows(tmp_path / "d")  # still a plain export to every other reader
    assert rows.ids.tolist() == batch.ids.tolist()
    export_table(table, tmp_path / "plain")
    assert read_deleted(tmp_path / "plain").shape == (0,)
    raw = bytearray((tmp_path / "d" / "deleted.npy").read_bytes())
    raw[-1] ^= 1
    (tmp_path / "d" / "deleted.npy").write_bytes(bytes(raw))
    with pytest.raises(ExportError, match="checksum"):
        read_deleted(tmp_path / "d")
