"""PSClient, shard servers and dense tables on a real 3-node Redis Cluster (and one node)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from redis.cluster import RedisCluster

from pipeline.ps.client import PSClient
from pipeline.ps.dense import DenseConflict
from pipeline.ps.server import ServerOptions, ShardServer
from pipeline.ps.spec import TableSpec

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _spec(name: str) -> TableSpec:
    return TableSpec.from_dict(
        {
            "name": name,
            "dim": 3,
            "initializer": {"kind": "zeros"},
            "optimizer": {"kind": "sgd", "lr": 0.5},
            "accessor": {"admit_threshold": 0.0},
        }
    )


def test_pull_push_on_redis_cluster(redis_cluster_url: str, unique: str, tmp_path: Path) -> None:
    specs = [_spec(f"a{unique}"), _spec(f"b{unique}")]  # two tables: streams in different slots
    shards = 3
    servers = [
        ShardServer(
            RedisCluster.from_url(redis_cluster_url),
            specs,
            s,
            shards,
            ServerOptions(block_ms=20, data_dir=tmp_path, checkpoint_interval_s=0.2),
        )
        for s in range(shards)
    ]
    stop = threading.Event()
    threads = [threading.Thread(target=s.run, args=(stop,), daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        client = PSClient(RedisCluster.from_url(redis_cluster_url))
        ids = np.arange(1, 301, dtype=np.uint64) * np.uint64(7919)
        for _ in range(60):  # the servers register their tables when they start
            try:
                client.route(specs[1].name)
                break
            except Exception:
                time.sleep(0.05)
        receipts = [client.push(spec.name, ids, np.ones((300, 3), np.float32)) for spec in specs]
        for receipt in receipts:
            client.wait_applied(receipt, timeout_s=20)
        for spec in specs:
            weights, found = client.pull(spec.name, ids)
            assert found.all()
            np.testing.assert_allclose(weights, -0.5)
        # the shards really are spread over the nodes
        nodes = {
            RedisCluster.from_url(redis_cluster_url).keyslot(f"gs:{{{specs[0].name}:{s}}}") // 5462
            for s in range(shards)
        }
        assert len(nodes) >= 2
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for s in servers:
            s.close()


@pytest.mark.parametrize("kind", ["single", "cluster"])
def test_dense_versions_and_conflicts(
    kind: str, redis_cluster_url: str, redis_url: str, unique: str
) -> None:
    client: Any = (
        RedisCluster.from_url(redis_cluster_url)
        if kind == "cluster"
        else redis.Redis.from_url(redis_url)
    )
    ps = PSClient(client)
    name = f"dense{unique}"
    assert ps.pull_dense(name) == (0, {})
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    assert ps.push_dense(name, tensors) == 1
    assert ps.push_dense(name, tensors, expected_version=1) == 2
    with pytest.raises(DenseConflict, match="version 2, expected 1"):
        ps.push_dense(name, tensors, expected_version=1)
    version, back = ps.pull_dense(name)
    assert version == 2 and list(back) == ["w", "b"]
    np.testing.assert_array_equal(back["w"], tensors["w"])
