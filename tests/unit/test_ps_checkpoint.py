"""Incremental checkpoints: a base plus deltas, restored at any durable point, equal the
table that applied the same pushes up to that point, bit for bit (both tiers)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.ps import checkpoint as checkpoint_module
from pipeline.ps.checkpoint import CURRENT, CheckpointError, CheckpointOptions, Checkpoints
from pipeline.ps.export import export_table
from pipeline.ps.spec import TableSpec
from pipeline.ps.table import ShardTable
from pipeline.ps.tiers import MemoryTier

pytestmark = pytest.mark.unit

DIM = 4
NOW = 1_700_000_000
SPEC = TableSpec.from_dict(
    {
        "name": "t",
        "dim": DIM,
        "initializer": {"kind": "uniform", "scale": 0.1, "seed": 3},
        "optimizer": {"kind": "adagrad", "lr": 0.1},
        "accessor": {
            "admit_threshold": 1.0,
            "show_click_decay_rate": 1.0,
            "delete_threshold": 0.0,
            "delete_after_unseen_days": 1.0,
        },
    }
)
DECAYING = TableSpec.from_dict({**SPEC.to_dict(), "accessor": {"show_click_decay_rate": 0.9}})
# Small numbers so that one test sees many deltas, bases written over many rounds, compaction.
OPTIONS = CheckpointOptions(
    interval_s=1e9,
    max_delta_rows=40,
    compact_fraction=0.5,
    base_slice_rows=16,
    base_slice_budget_s=0.0,  # one slice per round
    base_queue_slices=2,
)


def make_table(spec: TableSpec = SPEC, budget: int | None = 60) -> ShardTable:
    cold = MemoryTier(ShardTable(spec).cold_width) if budget else None
    return ShardTable(spec, cold, hot_budget_rows=budget, initial_capacity=16)


def state(table: ShardTable) -> dict[int, tuple[bytes, ...]]:
    out = {}
    for b in table.export_rows(chunk_rows=64):
        for i in range(len(b)):
            out[int(b.ids[i])] = tuple(
                getattr(b, c)[i].tobytes()
                for c in ("weights", "opt_state", "show", "click", "last_seen", "admitted")
            )
    return out


class Stream:
    """Pushes with stream ids "<i>-0" (i = 1, 2, ...), and the table after any prefix."""

    def __init__(self, seed: int, spec: TableSpec = SPEC, universe: int = 400) -> None:
        self.spec, self.rng, self.universe = spec, np.random.default_rng(seed), universe
        self.ops: list[tuple[str, Any]] = []

    def push(self, table: ShardTable) -> str:
        n = 64
        ids = (self.rng.zipf(1.2, n) % self.universe).astype(np.uint64) * np.uint64(
            0x9E3779B97F4A7C15
        )
        grads = self.rng.normal(size=(n, DIM)).astype(np.float32)
        clicks = (self.rng.random(n) < 0.3).astype(np.float32)
        now = NOW + len(self.ops) * 600
        self.ops.append(("push", (ids, grads, clicks, now)))
        table.apply_push(ids, grads, clicks=clicks, now=now)
        return f"{len(self.ops)}-0"

    def shrink(self, table: ShardTable) -> str:
        now = NOW + len(self.ops) * 600
        self.ops.append(("shrink", now))
        table.shrink(now=now)
        return f"{len(self.ops)}-0"

    def reference(self, stream_id: str, budget: int | None = 60) -> ShardTable:
        table = make_table(self.spec, budget)
        for kind, args in self.ops[: int(stream_id.split("-")[0])]:
            if kind == "push":
                ids, grads, clicks, now = args
                table.apply_push(ids, grads, clicks=clicks, now=now)
            else:
                table.shrink(now=args)
        return table


@pytest.fixture
def chains(tmp_path: Path) -> Iterator[list[Checkpoints]]:
    """Checkpoints objects of a test, closed at its end (they own writer threads)."""
    made: list[Checkpoints] = []
    yield made
    for cp in made:
        cp.close()


def open_chain(
    chains: list[Checkpoints], path: Path, table: ShardTable, options: CheckpointOptions = OPTIONS
) -> Checkpoints:
    cp = Checkpoints(path, table, options)
    chains.append(cp)
    return cp


def copy_chain(src: Path, dst: Path) -> None:
    """What a crash leaves that matters: CURRENT and the pieces it names."""
    info = json.loads((src / CURRENT).read_text())
    dst.mkdir()
    shutil.copy2(src / CURRENT, dst / CURRENT)
    for piece in [info["base"], *info["deltas"]]:
        shutil.copytree(src / piece["name"], dst / piece["name"])


def restored(
    chains: list[Checkpoints], path: Path, budget: int | None = 60, spec: TableSpec = SPEC
) -> tuple[ShardTable, str | None]:
    table = make_table(spec, budget)
    stream_id = open_chain(chains, path, table).restore()
    return table, stream_id


def test_restore_at_every_durable_point_equals_the_reference(
    tmp_path: Path, chains: list[Checkpoints]
) -> None:
    """Pushes (admission, demotion, promotion), shrink deletions, and a shrink that
    decays the cold tier (a base must follow), with fuzzy bases over many rounds."""
    spec = SPEC
    stream = Stream(1, spec)
    table = make_table(spec)
    cp = open_chain(chains, tmp_path / "live", table)
    assert cp.restore() is None  # fresh: an empty base is written at once
    checked: set[str] = set()
    for step in range(1, 181):
        stream_id = stream.shrink(table) if step % 45 == 0 else stream.push(table)
        cp.step(stream_id)
        if step % 15 == 0:
            cp.wait()
            durable = cp.durable_stream_id
            assert durable is not None
            copy = tmp_path / f"crash{step}"
            copy_chain(tmp_path / "live", copy)
            got, got_id = restored(chains, copy)
            assert got_id == durable
            assert state(got) == state(stream.reference(durable))
            checked.add(durable)
    assert len(checked) >= 10  # the durable point kept moving
    assert cp.stats.deltas >= 20 and cp.stats.bases >= 3  # compaction happened, repeatedly
    assert cp.stats.failures == 0
    on_disk = sorted(p.name for p in (tmp_path / "live").iterdir())
    assert len(on_disk) < 30, on_disk  # old chains are deleted


def test_a_decaying_shrink_forces_a_base(tmp_path: Path, chains: list[Checkpoints]) -> None:
    stream = Stream(2, DECAYING)
    table = make_table(DECAYING)
    cp = open_chain(chains, tmp_path, table)
    cp.restore()
    for _ in range(10):
        cp.step(stream.push(table))
    bases = cp.stats.bases
    stream_id = stream.shrink(table)
    assert not table.tracking_changes  # every cold row decayed: no delta describes that
    cp.sync(stream_id)
    assert cp.stats.bases == bases + 1 and table.tracking_changes
    table2 = make_table(DECAYING)
    stream_id = open_chain(chains, tmp_path, table2).restore()
    assert stream_id == "11-0"
    assert state(table2) == state(stream.reference("11-0"))


def test_restart_continues_the_chain_without_a_new_base(
    tmp_path: Path, chains: list[Checkpoints]
) -> None:
    stream = Stream(3)
    table = make_table()
    cp = open_chain(chains, tmp_path, table, OPTIONS)
    cp.restore()
    for _ in range(5):
        cp.step(stream.push(table))
    cp.sync("5-0")
    cp.close()
    again = make_table()
    cp2 = open_chain(chains, tmp_path, again, OPTIONS)
    assert cp2.restore() == "5-0"
    for _ in range(3):
        cp2.step(stream.push(again))
    cp2.sync("8-0")
    assert cp2.stats.bases == 0 and cp2.stats.deltas >= 1
    third, stream_id = restored(chains, tmp_path)
    assert stream_id == "8-0"
    assert state(third) == state(stream.reference("8-0")) == state(again)


def test_leftovers_of_a_crash_are_deleted(tmp_path: Path, chains: list[Checkpoints]) -> None:
    table = make_table()
    cp = open_chain(chains, tmp_path, table)
    cp.restore()
    stream = Stream(4)
    cp.sync(stream.push(table))
    cp.close()
    (tmp_path / "ckpt-9999999999-delta").mkdir()  # written, never named by CURRENT
    (tmp_path / ".ckpt-0000000007-delta.tmp-1234").mkdir()
    (tmp_path / "CURRENT.tmp").write_text("{")
    (tmp_path / "cold").mkdir()  # the live cold tier's directory is not ours
    got, _ = restored(chains, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert "ckpt-9999999999-delta" not in names and "CURRENT.tmp" not in names
    assert not any(n.startswith(".ckpt-") for n in names) and "cold" in names
    assert state(got) == state(table)


def test_corrupt_pieces_are_refused(tmp_path: Path, chains: list[Checkpoints]) -> None:
    table = make_table()
    cp = open_chain(chains, tmp_path, table)
    cp.restore()
    stream = Stream(5)
    cp.sync(stream.push(table))
    cp.sync(stream.push(table))
    cp.close()
    info = json.loads((tmp_path / CURRENT).read_text())
    delta = tmp_path / info["deltas"][-1]["name"]
    weights = delta / "weights.npy"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        restored(chains, tmp_path)
    meta = delta / "meta.json"
    meta.write_text(meta.read_text().replace('"rows"', '"rows" ', 1))
    with pytest.raises(CheckpointError, match="sha256"):
        restored(chains, tmp_path)


def test_a_base_with_a_cold_tier_needs_one(tmp_path: Path, chains: list[Checkpoints]) -> None:
    table = make_table()
    cp = open_chain(chains, tmp_path, table)
    cp.restore()
    cp.sync(Stream(6).push(table))
    cp.close()
    with pytest.raises(CheckpointError, match="cold tier"):
        restored(chains, tmp_path, budget=None)


def test_a_failed_delta_write_falls_back_to_a_new_base(
    tmp_path: Path, chains: list[Checkpoints], monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = Stream(7)
    table = make_table()
    cp = open_chain(chains, tmp_path, table)
    cp.restore()
    for _ in range(3):
        cp.step(stream.push(table))
    cp.sync(stream.push(table))
    durable = cp.durable_stream_id
    real = checkpoint_module.write_rows
    calls = {"n": 0}

    def failing(path: Path, *args: Any, **kwargs: Any) -> Any:
        if "delta" in Path(path).name and calls["n"] == 0:
            calls["n"] += 1
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "write_rows", failing)
    cp.sync(stream.push(table))  # this delta is lost ...
    assert cp.stats.failures == 1 and cp.durable_stream_id == durable
    for _ in range(5):  # ... so a new base starts
        cp.step(stream.push(table))
    cp.sync(stream.push(table))
    assert cp.durable_stream_id == "11-0" and cp.stats.bases >= 2
    got, stream_id = restored(chains, tmp_path)
    assert stream_id == "11-0" and state(got) == state(stream.reference("11-0"))


def test_a_full_export_checkpoint_of_older_servers_is_read(
    tmp_path: Path, chains: list[Checkpoints]
) -> None:
    stream = Stream(8)
    old = make_table(budget=None)
    for _ in range(4):
        stream.push(old)
    export_table(old, tmp_path / "ckpt-4-0")
    (tmp_path / CURRENT).write_text(json.dumps({"checkpoint": "ckpt-4-0", "stream_id": "4-0"}))
    table = make_table()
    cp = open_chain(chains, tmp_path, table)
    assert cp.restore() == "4-0" and state(table) == state(old)
    cp.sync(stream.push(table))  # becomes a chain: a base, then the old export goes
    assert not (tmp_path / "ckpt-4-0").exists()
    got, stream_id = restored(chains, tmp_path)
    assert stream_id == "5-0" and state(got) == state(stream.reference("5-0"))


def test_replace_starts_over_from_a_loaded_table(tmp_path: Path, chains: list[Checkpoints]) -> None:
    stream = Stream(9)
    table = make_table()
    cp = open_chain(chains, tmp_path, table)
    cp.restore()
    for _ in range(6):
        cp.step(stream.push(table))
    cp.sync("6-0")
    cp.close()
    old = {p.name for p in tmp_path.iterdir()}
    other = make_table()  # loaded from elsewhere (a snapshot)
    Stream(10).push(other)
    cp2 = open_chain(chains, tmp_path, other)
    cp2.replace()
    cp2.sync("100-0")
    assert not old & {p.name for p in tmp_path.iterdir()} - {CURRENT}
    got, stream_id = restored(chains, tmp_path)
    assert stream_id == "100-0" and state(got) == state(other)


def test_a_base_read_while_pushes_go_on_is_closed_by_a_delta(
    tmp_path: Path, chains: list[Checkpoints]
) -> None:
    """No delta is due on its own here: the base (one slice per round, pushes between
    slices) becomes the chain only with the delta cut after its scan ended."""
    options = CheckpointOptions(
        interval_s=1e9, max_delta_rows=10_000, base_slice_rows=8, base_slice_budget_s=0.0
    )
    stream = Stream(11, DECAYING)
    table = make_table(DECAYING, budget=100)
    cp = open_chain(chains, tmp_path, table, options)
    cp.restore()
    for _ in range(20):
        stream.push(table)
    stream.shrink(table)  # tracking lost: the next step starts a base
    for _ in range(200):
        cp.step(stream.push(table))
        if cp.stats.bases == 2:
            break
    assert cp.stats.bases == 2, "the base never became the chain"
    cp.wait()
    durable = cp.durable_stream_id
    assert durable is not None and int(durable.split("-")[0]) > 30  # read over many rounds
    got, stream_id = restored(chains, tmp_path, budget=100, spec=DECAYING)
    assert stream_id == durable
    assert state(got) == state(stream.reference(durable, budget=100))
