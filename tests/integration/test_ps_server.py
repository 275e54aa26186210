"""Shard servers and PSClient against a real redis-server (servers in threads or processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import yaml

from pipeline.ps.client import PSClient, TableRoute
from pipeline.ps.gradstream import Push, encode_push
from pipeline.ps.keys import ShardKeys
from pipeline.ps.server import ServerOptions
from pipeline.ps.spec import TableSpec
from pipeline.ps.table import ShardTable
from tests.procgroups import ProcessGroups
from tests.psservers import shard_servers

pytestmark = pytest.mark.integration

SHARDS = 2


def _spec(
    name: str, dim: int = 4, optimizer: str = "sgd", threshold: float = 0.0, **acc: Any
) -> TableSpec:
    return TableSpec.from_dict(
        {
            "name": name,
            "dim": dim,
            "initializer": {"kind": "zeros"},
            "optimizer": {"kind": optimizer, "lr": 0.1},
            "accessor": {"admit_threshold": threshold, **acc},
        }
    )


def _pushes(
    seed: int, count: int, dim: int, vocab: int = 300, rows: int = 64
) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (
            rng.integers(0, vocab, rows).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15),
            rng.normal(size=(rows, dim)).astype(np.float32),
        )
        for _ in range(count)
    ]


def _push_all(client: PSClient, table: str, pushes: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for ids, grads in pushes:
        client.push(table, ids, grads)
    client.flush()


def _reference(spec: TableSpec, pushes: list[tuple[np.ndarray, np.ndarray]]) -> ShardTable:
    table = ShardTable(spec, clock=lambda: 1_700_000_000)
    for ids, grads in pushes:
        table.apply_push(ids, grads)
    return table


def test_two_clients_two_shards_sgd_equals_single_process_reference(
    redis_url: str, unique: str
) -> None:
    spec = _spec(f"sgd{unique}")
    a, b = _pushes(1, 25, spec.dim), _pushes(2, 25, spec.dim)
    route = {spec.name: TableRoute(spec.dim, SHARDS)}
    with shard_servers(redis_url, [spec]):
        clients = [
            PSClient(redis.Redis.from_url(redis_url), route, f"t{i}", max_inflight=4)
            for i in range(2)
        ]
        threads = [
            threading.Thread(target=_push_all, args=(c, spec.name, p))
            for c, p in zip(clients, (a, b), strict=False)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        ids = np.unique(np.concatenate([i for i, _ in a + b]))
        weights, found = clients[0].pull(spec.name, ids)
    ref_found, ref_weights = _reference(spec, a + b).lookup(ids)
    assert found.all() and ref_found.all()
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-5, atol=1e-6)
    assert np.abs(weights).max() > 0.1  # the pushes really moved the weights


def test_two_clients_adagrad_matches_reference_in_stream_order(
    redis_url: str, unique: str, tmp_path: Path
) -> None:
    """Adagrad depends on the order pushes are applied; replaying each shard's stream
    order through a single-process table must give the same weights (float tolerance).
    A data_dir keeps entries in the streams until a checkpoint, so the order is readable."""
    from pipeline.ps.gradstream import decode_push

    spec = _spec(f"ada{unique}", optimizer="adagrad")
    a, b = _pushes(3, 20, spec.dim), _pushes(4, 20, spec.dim)
    route = {spec.name: TableRoute(spec.dim, SHARDS)}
    options = ServerOptions(block_ms=20, data_dir=tmp_path, checkpoint_interval_s=3600)
    r = redis.Redis.from_url(redis_url)
    with shard_servers(redis_url, [spec], options=options):
        clients = [PSClient(redis.Redis.from_url(redis_url), route, f"t{i}") for i in range(2)]
        threads = [
            threading.Thread(target=_push_all, args=(c, spec.name, p))
            for c, p in zip(clients, (a, b), strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        ids = np.unique(np.concatenate([i for i, _ in a + b]))
        weights, found = clients[0].pull(spec.name, ids)
        applied_order = [
            decode_push(fields, spec.dim)
            for shard in range(SHARDS)
            for _, fields in r.xrange(ShardKeys(spec.name, shard).stream)
        ]
    assert len(applied_order) == 2 * 40  # 40 pushes, each split over 2 shards
    reference = _reference(spec, [(p.ids, p.values) for p in applied_order])
    _, ref = reference.lookup(ids)
    assert found.all()
    np.testing.assert_allclose(weights, ref, rtol=1e-5, atol=1e-6)
    # and the order really matters for Adagrad (the check above is not vacuous)
    _, other = _reference(spec, a + b).lookup(ids)
    assert np.abs(other - ref).max() > 1e-3


def test_admission_threshold_and_pull_misses(redis_url: str, unique: str) -> None:
    spec = _spec(f"adm{unique}", threshold=1.5, nonclk_coeff=0.1, clk_coeff=1.0)
    client = PSClient(redis.Redis.from_url(redis_url), {spec.name: TableRoute(spec.dim, SHARDS)})
    ids = np.array([11, 22], dtype=np.uint64)
    grads = np.ones((2, spec.dim), np.float32)
    with shard_servers(redis_url, [spec]):
        client.wait_applied(client.push(spec.name, ids, grads))  # score 0.1 each: not admitted
        _, found = client.pull(spec.name, ids)
        assert found.tolist() == [False, False]
        receipt = client.push(spec.name, ids[:1], grads[:1], clicks=np.array([2.0], np.float32))
        client.wait_applied(receipt)
        weights, found = client.pull(spec.name, ids)
    assert found.tolist() == [True, False]
    # Admitted by this push: initialized (zeros), then updated once; earlier grads only counted.
    np.testing.assert_allclose(weights[0], -0.1 * np.ones(spec.dim))
    assert not weights[1].any()


def test_shrink_deletes_unseen_rows_from_the_pull_view(redis_url: str, unique: str) -> None:
    spec = _spec(f"evict{unique}", delete_after_unseen_days=1.0, delete_threshold=0.0)
    now = [1_700_000_000]
    client = PSClient(redis.Redis.from_url(redis_url), {spec.name: TableRoute(spec.dim, SHARDS)})
    old, fresh = np.arange(0, 50, dtype=np.uint64), np.arange(50, 100, dtype=np.uint64)
    with shard_servers(redis_url, [spec], clock=lambda: now[0]) as running:
        client.wait_applied(client.push(spec.name, old, np.ones((50, spec.dim), np.float32)))
        now[0] += 2 * 86_400
        client.wait_applied(client.push(spec.name, fresh, np.ones((50, spec.dim), np.float32)))
        deleted = sum(server.shrink() for server in running)
        _, found = client.pull(spec.name, np.concatenate([old, fresh]))
    assert deleted == 50
    assert not found[:50].any() and found[50:].all()


def test_bad_entries_are_counted_and_skipped(redis_url: str, unique: str) -> None:
    spec = _spec(f"bad{unique}")
    r = redis.Redis.from_url(redis_url)
    client = PSClient(r, {spec.name: TableRoute(spec.dim, 1)})
    stream = ShardKeys(spec.name, 0).stream
    good = np.array([5], np.uint64)
    zero = np.zeros(1, np.float32)
    with shard_servers(redis_url, [spec], shards=1):
        r.xadd(stream, {b"h": b"{broken"})
        r.xadd(
            stream, encode_push(Push("grad", "x", 1, good, np.ones((1, 3), np.float32), zero, zero))
        )
        nan = encode_push(
            Push("grad", "x", 2, good, np.full((1, spec.dim), np.nan, np.float32), zero, zero)
        )
        r.xadd(stream, nan)
        client.wait_applied(client.push(spec.name, good, np.ones((1, spec.dim), np.float32)))
        weights, found = client.pull(spec.name, good)
        meta = r.hgetall(ShardKeys(spec.name, 0).meta)
    assert found.all()
    np.testing.assert_allclose(weights, -0.1)  # only the valid push was applied
    assert int(meta[b"rejected:bad_header"]) == 1
    assert int(meta[b"rejected:wrong_dim"]) == 1
    assert int(meta[b"rejected:non_finite"]) == 1


def test_client_rejects_bad_pushes_before_sending(redis_url: str, unique: str) -> None:
    from pipeline.ps.gradstream import StreamEntryError

    spec = _spec(f"cli{unique}")
    r = redis.Redis.from_url(redis_url)
    client = PSClient(r, {spec.name: TableRoute(spec.dim, 1)})
    ids = np.array([1, 2], np.uint64)
    for grads, reason in (
        (np.ones((2, 3)), "wrong_dim"),
        (np.full((2, spec.dim), np.inf), "non_finite"),
    ):
        with pytest.raises(StreamEntryError) as info:
            client.push(spec.name, ids, grads)
        assert info.value.reason == reason
    assert r.xlen(ShardKeys(spec.name, 0).stream) == 0


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test alone (it gets flushed)."""
    from pipeline.stack import private_redis as spawn

    with spawn(tmp_path) as url:
        yield url


def test_server_rebuilds_pull_view_after_redis_flush(private_redis: str, unique: str) -> None:
    spec = _spec(f"flush{unique}")
    r = redis.Redis.from_url(private_redis)
    route = {spec.name: TableRoute(spec.dim, SHARDS)}
    ids = np.arange(100, dtype=np.uint64)
    with shard_servers(private_redis, [spec]):
        client = PSClient(r, route)
        client.wait_applied(client.push(spec.name, ids, np.ones((100, spec.dim), np.float32)))
        before, _ = client.pull(spec.name, ids)
        r.flushall()
        deadline = time.monotonic() + 10
        found = np.zeros(len(ids), bool)
        while not found.all() and time.monotonic() < deadline:
            time.sleep(0.05)
            after, found = client.pull(spec.name, ids)
        # and the servers keep applying new pushes on the rebuilt streams
        client2 = PSClient(r, route)
        client2.wait_applied(client2.push(spec.name, ids, np.ones((100, spec.dim), np.float32)))
        again, _ = client2.pull(spec.name, ids)
    assert found.all()
    np.testing.assert_array_equal(after, before)
    np.testing.assert_allclose(again, before - 0.1)


def _ps_process(
    processes: ProcessGroups, url: str, catalog: Path, data_dir: Path, shard: int, shards: int
) -> subprocess.Popen[bytes]:
    return processes.start(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "ps",
            "--shard",
            str(shard),
            "--shards",
            str(shards),
            "--tables",
            str(catalog),
            "--data-dir",
            str(data_dir),
            "--redis-url",
            url,
            "--checkpoint-interval",
            "0.3",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


@pytest.mark.slow
def test_sigkill_and_restart_loses_no_acknowledged_push(
    redis_url: str, unique: str, tmp_path: Path, processes: ProcessGroups
) -> None:
    spec = _spec(f"kill{unique}")
    catalog = tmp_path / "tables.yaml"
    catalog.write_text(yaml.safe_dump({"tables": [spec.to_dict()]}))
    data = tmp_path / "data"
    pushes = _pushes(9, 120, spec.dim, vocab=2000, rows=256)
    client = PSClient(
        redis.Redis.from_url(redis_url),
        {spec.name: TableRoute(spec.dim, SHARDS)},
        max_inflight=1000,
        backpressure_timeout_s=60,
    )
    procs = [_ps_process(processes, redis_url, catalog, data, s, SHARDS) for s in range(SHARDS)]
    try:
        for i, (ids, grads) in enumerate(pushes):
            client.push(spec.name, ids, grads)  # acknowledged once XADD returns
            if i == 60:
                time.sleep(0.8)  # let at least one checkpoint happen
                os.killpg(procs[0].pid, signal.SIGKILL)
                procs[0].wait(10)
        time.sleep(0.2)
        procs[0] = _ps_process(processes, redis_url, catalog, data, 0, SHARDS)
        client.flush(timeout_s=60)
        ids = np.unique(np.concatenate([i for i, _ in pushes]))
        weights, found = client.pull(spec.name, ids)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
    assert procs[1].returncode == 0, procs[1].stderr.read() if procs[1].stderr else ""
    _ref_found, ref = _reference(spec, pushes).lookup(ids)
    assert found.all()
    np.testing.assert_allclose(weights, ref, rtol=1e-5, atol=1e-5)
    assert any((data / spec.name / "shard-0-of-2").glob("ckpt-*")), "no checkpoint was written"


def _table_state(table: ShardTable) -> dict[int, tuple[bytes, ...]]:
    """Every row of both tiers, bitwise, by id."""
    out = {}
    for b in table.export_rows():
        for i in range(len(b)):
            out[int(b.ids[i])] = tuple(
                getattr(b, c)[i].tobytes()
                for c in ("weights", "opt_state", "show", "click", "last_seen", "admitted")
            )
    return out


def _load_chain(spec: TableSpec, directory: Path, work: Path, budget: int) -> tuple[Any, str]:
    """The table a restart would load from ``directory`` (copied: restore cleans up)."""
    import json
    import shutil

    from pipeline.ps.checkpoint import CURRENT, CheckpointOptions, Checkpoints
    from pipeline.ps.table import cold_width
    from pipeline.ps.tiers import SsdTier

    info = json.loads((directory / CURRENT).read_text())
    work.mkdir()
    shutil.copy2(directory / CURRENT, work / CURRENT)
    for piece in [info["base"], *info["deltas"]]:
        shutil.copytree(directory / piece["name"], work / piece["name"])
    cold = SsdTier(work / "cold", cold_width(spec), block_cache_bytes=8 << 20)
    table = ShardTable(spec, cold, hot_budget_rows=budget)
    checkpoints = Checkpoints(work, table, CheckpointOptions())
    stream_id = checkpoints.restore()
    checkpoints.close()
    assert stream_id is not None
    return table, stream_id


@pytest.mark.slow
def test_sigkill_after_incremental_checkpoints_restores_the_exact_table(
    redis_url: str, unique: str, tmp_path: Path, processes: ProcessGroups
) -> None:
    """A server with an SSD tier (budget 10x below the ids) writes many deltas and several
    bases, is SIGKILLed while pushes arrive, restarts: the checkpoint on disk at the kill
    is the reference table at its stream id, and the final table is the reference after
    every push, bit for bit (weights, optimizer state, statistics, admission)."""
    import json

    from pipeline.ps.checkpoint import CURRENT
    from pipeline.ps.gradstream import stream_id_tuple

    now, budget = 1_700_000_000, 200
    spec = _spec(f"inc{unique}", optimizer="adagrad", threshold=1.0, clk_coeff=1.0)
    data = tmp_path / "data"
    shard_dir = data / spec.name / "shard-0-of-1"
    rng = np.random.default_rng(12)
    pushes = [
        (
            (rng.zipf(1.2, 256) % 2000).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15),
            rng.normal(size=(256, spec.dim)).astype(np.float32),
            (rng.random(256) < 0.2).astype(np.float32),
        )
        for _ in range(120)
    ]
    client = PSClient(
        redis.Redis.from_url(redis_url),
        {spec.name: TableRoute(spec.dim, 1)},
        max_inflight=1000,
        backpressure_timeout_s=60,
    )

    def server() -> subprocess.Popen[bytes]:
        args = [redis_url, json.dumps(spec.to_dict()), str(data), str(now)]
        args += ["--budget", str(budget), "--max-delta-rows", "300", "--interval", "0.2"]
        return processes.start(
            [sys.executable, "-m", "tests.psservers", *args],
            cwd=Path(__file__).resolve().parents[2],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

    def reference(count: int) -> ShardTable:
        table = ShardTable(spec, clock=lambda: now)
        for ids, grads, clicks in pushes[:count]:
            table.apply_push(ids, grads, clicks=clicks)
        return table

    def chain() -> dict[str, Any]:
        try:
            return dict(json.loads((shard_dir / CURRENT).read_text()))
        except (OSError, ValueError):
            return {}

    entry_ids: list[bytes] = []
    proc = server()
    try:
        for ids, grads, clicks in pushes[:60]:
            entry_ids.append(client.push(spec.name, ids, grads, clicks=clicks).entries[0])
        client.flush(timeout_s=60)
        deadline = time.monotonic() + 60  # a guard against hanging, not a speed check
        while not (chain().get("base", {}).get("cut", 1) > 1 and len(chain()["deltas"]) >= 2):
            assert time.monotonic() < deadline, f"no compacted chain with deltas: {chain()}"
            time.sleep(0.05)
        for ids, grads, clicks in pushes[60:80]:  # arriving while the server dies
            entry_ids.append(client.push(spec.name, ids, grads, clicks=clicks).entries[0])
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

        at_kill, stream_id = _load_chain(spec, shard_dir, tmp_path / "at-kill", budget)
        covered = sum(stream_id_tuple(e) <= stream_id_tuple(stream_id) for e in entry_ids)
        assert covered >= 60
        assert _table_state(at_kill) == _table_state(reference(covered))
        at_kill.cold_tier.close()  # type: ignore[union-attr]

        proc = server()
        for ids, grads, clicks in pushes[80:]:
            client.push(spec.name, ids, grads, clicks=clicks)
        client.flush(timeout_s=60)
        probe = np.unique(np.concatenate([ids for ids, _, _ in pushes]))
        weights, found = client.pull(spec.name, probe)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # a clean stop checkpoints once more
            proc.wait(30)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    final, stream_id = _load_chain(spec, shard_dir, tmp_path / "final", budget)
    want = reference(len(pushes))
    assert _table_state(final) == _table_state(want)
    ref_found, ref_weights = want.lookup(probe)
    np.testing.assert_array_equal(found, ref_found)
    np.testing.assert_array_equal(weights, ref_weights)  # the pull view too
    final.cold_tier.close()  # type: ignore[union-attr]
