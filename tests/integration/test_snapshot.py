"""Snapshots against real shard servers (threads) and Redis: the restored tables equal the
state at the cut array for array; tampered or unfinished snapshots are refused; a cut that
cannot complete leaves nothing behind; retention keeps the newest."""

from __future__ import annotations

import json
import shutil
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from pipeline.ps.client import PSClient, TableRoute, registry_key
from pipeline.ps.dense import pull_dense, push_dense
from pipeline.ps.export import RowBatch
from pipeline.ps.server import ServerOptions, ShardServer
from pipeline.ps.spec import TableSpec
from pipeline.snapshot.coordinator import SnapshotCoordinator
from pipeline.snapshot.layout import (
    SnapshotError,
    latest_snapshot,
    list_snapshots,
    load_snapshot,
)
from pipeline.snapshot.protocol import request_key
from pipeline.snapshot.restore import restore_dense, resume_positions
from tests.psservers import shard_servers

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHARDS = 2
COLUMNS = ("ids", "weights", "opt_state", "show", "click", "last_seen", "admitted")


def _servers(
    url: str, specs: list[TableSpec], restore: Path | None = None
) -> AbstractContextManager[list[ShardServer]]:
    options = ServerOptions(block_ms=20, restore=restore)
    return shard_servers(url, specs, SHARDS, options=options, wait_ready=True)


def _spec(name: str, dim: int, optimizer: str, threshold: float) -> TableSpec:
    return TableSpec.from_dict(
        {
            "name": name,
            "dim": dim,
            "initializer": {"kind": "normal", "std": 0.01, "seed": 5},
            "optimizer": {"kind": optimizer, "lr": 0.05},
            "accessor": {"admit_threshold": threshold},
        }
    )


def _state(running: list[ShardServer], table: str) -> list[dict[str, np.ndarray]]:
    """Every column of every shard's rows, sorted by id (both tiers, as exported)."""
    out = []
    for server in running:
        batches: list[RowBatch] = list(server.table(table).export_rows())
        cols = {c: np.concatenate([getattr(b, c) for b in batches]) for c in COLUMNS}
        order = np.argsort(cols["ids"])
        out.append({c: v[order] for c, v in cols.items()})
    return out


def _assert_same(got: list[dict[str, np.ndarray]], want: list[dict[str, np.ndarray]]) -> None:
    for g, w in zip(got, want, strict=True):
        for c in COLUMNS:
            np.testing.assert_array_equal(g[c], w[c], err_msg=c)


class _Scenario:
    """Two tables (Adagrad dim 4 with admission, SGD dim 1), a dense table, one client."""

    def __init__(self, url: str, unique: str) -> None:
        self.url = url
        self.r = redis.Redis.from_url(url)
        self.specs = [_spec(f"a{unique}", 4, "adagrad", 1.5), _spec(f"b{unique}", 1, "sgd", 0.0)]
        routes = {s.name: TableRoute(s.dim, SHARDS) for s in self.specs}
        self.ps = PSClient(self.r, routes, trainer_id="t0")
        self.dense = f"dense{unique}"
        self.rng = np.random.default_rng(7)
        self.step = 0

    def push(self, ids: np.ndarray, rounds: int) -> None:
        for _ in range(rounds):
            self.step += 1
            offsets = {"samples": {"0": 10 * self.step, "1": 5 * self.step}}
            for spec in self.specs:
                grads = self.rng.normal(size=(len(ids), spec.dim)).astype(np.float32)
                clicks = (self.rng.random(len(ids)) < 0.3).astype(np.float32)
                self.ps.push(spec.name, ids, grads, clicks=clicks, offsets=offsets)
        self.ps.flush()

    def coordinator(self, directory: Path, **kwargs: Any) -> SnapshotCoordinator:
        kwargs.setdefault("ack_timeout_s", 20.0)
        return SnapshotCoordinator(
            self.r, directory, [s.name for s in self.specs], [self.dense], **kwargs
        )


def test_restore_gives_exactly_the_state_at_the_cut(
    redis_url: str, unique: str, tmp_path: Path
) -> None:
    sc = _Scenario(redis_url, unique)
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}
    with _servers(redis_url, sc.specs) as running:
        sc.push(np.arange(200, dtype=np.uint64), rounds=3)
        push_dense(sc.r, sc.dense, tensors)
        coordinator = sc.coordinator(tmp_path / "snaps")
        taken = coordinator.take()
        at_cut = {s.name: _state(running, s.name) for s in sc.specs}
        offsets_at_cut = {("samples", 0): 10 * sc.step, ("samples", 1): 5 * sc.step}
        # keep training: more rows, more updates of old rows, a new dense version
        sc.push(np.arange(100, 300, dtype=np.uint64), rounds=2)
        push_dense(sc.r, sc.dense, {k: v + 1 for k, v in tensors.items()})
        after = {s.name: _state(running, s.name) for s in sc.specs}
        coordinator.release()
    for name, shards in after.items():
        assert sum(len(p["ids"]) for p in shards) > sum(len(p["ids"]) for p in at_cut[name])

    assert taken.rows == {n: sum(len(p["ids"]) for p in s) for n, s in at_cut.items()}
    snap = load_snapshot(taken.path, full=True)
    assert snap.offsets() == offsets_at_cut == resume_positions(taken.path)
    assert list_snapshots(tmp_path / "snaps")[-1].id == taken.id
    assert not list((tmp_path / "snaps").glob("*.tmp"))

    with _servers(redis_url, sc.specs, restore=taken.path) as restored:
        for spec in sc.specs:
            _assert_same(_state(restored, spec.name), at_cut[spec.name])
        # the pull view is the snapshot's: admitted rows only, later rows gone
        ids = np.arange(300, dtype=np.uint64)
        for spec in sc.specs:
            weights, found = sc.ps.pull(spec.name, ids)
            want_w = np.zeros((300, spec.dim), np.float32)
            want_found = np.zeros(300, bool)
            for part in at_cut[spec.name]:
                rows = part["ids"][part["admitted"]].astype(np.int64)
                want_w[rows] = part["weights"][part["admitted"]]
                want_found[rows] = True
            assert want_found[:200].any() and not want_found[200:].any()
            np.testing.assert_array_equal(found, want_found)
            np.testing.assert_array_equal(weights, want_w)
        # training goes on from the restored state (entries from before the restore skipped)
        sc.ps = PSClient(sc.r, sc.ps.routes, trainer_id="t1")
        sc.push(np.array([5], np.uint64), rounds=1)
        b = sc.specs[1].name
        state = _state(restored, b)
        changed = [
            int(p["ids"][i])
            for p, q in zip(state, at_cut[b], strict=True)
            for i in np.flatnonzero(p["weights"][:, 0] != q["weights"][:, 0])
        ]
        assert changed == [5]

    version = restore_dense(sc.r, snap)[sc.dense]
    got_version, got = pull_dense(sc.r, sc.dense)
    assert got_version == version
    for k, v in tensors.items():
        np.testing.assert_array_equal(got[k], v)


def test_tampered_and_unfinished_snapshots_are_refused(
    redis_url: str, unique: str, tmp_path: Path
) -> None:
    sc = _Scenario(redis_url, unique)
    snaps = tmp_path / "snaps"
    with _servers(redis_url, sc.specs):
        sc.push(np.arange(50, dtype=np.uint64), rounds=1)
        push_dense(sc.r, sc.dense, {"w": np.ones(3, np.float32)})
        coordinator = sc.coordinator(snaps)
        good = coordinator.take()
        coordinator.release()
    a = sc.specs[0].name

    # a flipped byte in a column file: refused by full verification and by restore
    bad = tmp_path / "bad-column"
    shutil.copytree(good.path, bad)
    column = bad / "shards" / a / f"shard-0-of-{SHARDS}" / "weights.npy"
    raw = bytearray(column.read_bytes())
    raw[-1] ^= 0xFF
    column.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        load_snapshot(bad, full=True)
    with pytest.raises(SnapshotError, match=r"cannot restore .*checksum mismatch"):
        ShardServer(sc.r, sc.specs, 0, SHARDS, ServerOptions(restore=bad))

    # an edited meta.json (e.g. a hand-fixed checksum) no longer matches the manifest
    bad_meta = tmp_path / "bad-meta"
    shutil.copytree(good.path, bad_meta)
    meta = bad_meta / "shards" / a / f"shard-1-of-{SHARDS}" / "meta.json"
    meta.write_text(meta.read_text().replace('"rows"', '"rows" ', 1))
    with pytest.raises(SnapshotError, match="meta.json: checksum mismatch"):
        load_snapshot(bad_meta)

    # a missing part and a missing manifest
    no_part = tmp_path / "no-part"
    shutil.copytree(good.path, no_part)
    shutil.rmtree(no_part / "shards" / a / f"shard-1-of-{SHARDS}")
    with pytest.raises(SnapshotError, match="is missing"):
        load_snapshot(no_part)
    (no_part / "manifest.json").unlink()
    with pytest.raises(SnapshotError, match="no manifest.json"):
        load_snapshot(no_part)

    # a wrong shard count is refused
    with pytest.raises(SnapshotError, match=f"saved with {SHARDS} shards"):
        ShardServer(sc.r, sc.specs, 0, SHARDS + 1, ServerOptions(restore=good.path))

    # an unfinished (.tmp) snapshot, even a complete-looking one, is never used
    partial = snaps / "99991231T235959Z-999999.tmp"
    shutil.copytree(good.path, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    manifest["created_ms"] += 10**9
    (partial / "manifest.json").write_text(json.dumps(manifest))
    assert [s.id for s in list_snapshots(snaps)] == [good.id]
    assert latest_snapshot(snaps).id == good.id
    with pytest.raises(SnapshotError, match="unfinished"):
        load_snapshot(partial)


def test_a_cut_that_cannot_complete_leaves_nothing(
    redis_url: str, unique: str, tmp_path: Path
) -> None:
    sc = _Scenario(redis_url, unique)
    snaps = tmp_path / "snaps"
    ghost = f"ghost{unique}"  # registered, but its server is not running
    sc.r.set(registry_key(ghost), json.dumps({"dim": 1, "shards": 1}))
    with _servers(redis_url, sc.specs):
        sc.push(np.arange(20, dtype=np.uint64), rounds=1)
        push_dense(sc.r, sc.dense, {"w": np.ones(3, np.float32)})
        coordinator = SnapshotCoordinator(
            sc.r, snaps, [s.name for s in sc.specs] + [ghost], [sc.dense], ack_timeout_s=1.0
        )
        with pytest.raises(SnapshotError, match=rf"\['{ghost}:0'\] did not save"):
            coordinator.take()
        assert list(snaps.iterdir()) == []  # no temp dir, no snapshot
        assert not sc.r.keys(request_key("*"))  # request withdrawn: late shards save nothing
        # a second coordinator of the same series is refused while the first holds the lock
        other = sc.coordinator(snaps)
        with pytest.raises(SnapshotError, match="another snapshot coordinator"):
            other.take()
        coordinator.release()
        # the dense table must exist: an empty one aborts the cut cleanly too
        empty = SnapshotCoordinator(
            sc.r, snaps, [sc.specs[0].name], [f"none{unique}"], ack_timeout_s=10.0
        )
        with pytest.raises(SnapshotError, match="is empty"):
            empty.take()
        empty.release()
        assert list(snaps.iterdir()) == []


def test_retention_keeps_the_newest_and_one_per_day(
    redis_url: str, unique: str, tmp_path: Path
) -> None:
    sc = _Scenario(redis_url, unique)
    snaps = tmp_path / "snaps"
    day = 86_400_000
    times = iter([10 * day, 11 * day, 11 * day + 1000, 11 * day + 2000, 11 * day + 3000])
    with _servers(redis_url, sc.specs):
        sc.push(np.arange(20, dtype=np.uint64), rounds=1)
        push_dense(sc.r, sc.dense, {"w": np.ones(3, np.float32)})
        coordinator = sc.coordinator(snaps, keep=2, keep_daily=2, clock_ms=lambda: next(times))
        taken = [coordinator.take() for _ in range(5)]
        coordinator.release()
    ids = [t.id for t in taken]
    # newest two, plus the newest of day 10 (day 11's newest is already kept)
    assert [s.id for s in list_snapshots(snaps)] == [ids[0], ids[3], ids[4]]
    assert taken[3].deleted == [ids[1]] and taken[4].deleted == [ids[2]]
    assert sorted(p.name for p in snaps.iterdir()) == sorted([ids[0], ids[3], ids[4]])


def test_cli_run_once_list_and_verify(redis_url: str, unique: str, tmp_path: Path) -> None:
    import yaml
    from click.testing import CliRunner

    from pipeline.cli.snapshot import snapshot

    sc = _Scenario(redis_url, unique)
    catalog = tmp_path / "tables.yaml"
    catalog.write_text(yaml.safe_dump({"tables": [s.to_dict() for s in sc.specs]}))
    snaps = tmp_path / "snaps"
    runner = CliRunner()
    with _servers(redis_url, sc.specs):
        sc.push(np.arange(30, dtype=np.uint64), rounds=2)
        out = runner.invoke(
            snapshot,
            [
                *("run", "--once", "--dir", str(snaps), "--tables", str(catalog)),
                *("--redis-url", redis_url, "--name", unique, "--timeout", "20"),
            ],
        )
    assert out.exit_code == 0, out.output
    (snap,) = list_snapshots(snaps)
    assert f"snapshot {snap.id}" in out.output
    listed = runner.invoke(snapshot, ["list", str(snaps)])
    assert listed.exit_code == 0 and snap.id in listed.output
    verified = runner.invoke(snapshot, ["verify", "--json", str(snap.path)])
    assert verified.exit_code == 0, verified.output
    assert {(o["topic"], o["partition"]): o["offset"] for o in json.loads(verified.output)} == {
        ("samples", 0): 20,
        ("samples", 1): 10,
    }
    column = snap.path / "shards" / sc.specs[1].name / f"shard-0-of-{SHARDS}" / "click.npy"
    column.write_bytes(column.read_bytes()[:-4])
    tampered = runner.invoke(snapshot, ["verify", str(snap.path)])
    assert isinstance(tampered.exception, SnapshotError)
    assert "checksum mismatch" in str(tampered.exception)
