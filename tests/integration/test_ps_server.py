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
    url: str, catalog: Path, data_dir: Path, shard: int, shards: int
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
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
    redis_url: str, unique: str, tmp_path: Path
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
    procs = [_ps_process(redis_url, catalog, data, s, SHARDS) for s in range(SHARDS)]
    try:
        for i, (ids, grads) in enumerate(pushes):
            client.push(spec.name, ids, grads)  # acknowledged once XADD returns
            if i == 60:
                time.sleep(0.8)  # let at least one checkpoint happen
                os.killpg(procs[0].pid, signal.SIGKILL)
                procs[0].wait(10)
        time.sleep(0.2)
        procs[0] = _ps_process(redis_url, catalog, data, 0, SHARDS)
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
