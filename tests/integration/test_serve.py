"""``pipeline serve`` against real shard servers, Redis and the broker: predictions over
HTTP equal what the trainer's model computes from the PS (``Inferencer.score``) for the
same rows, before and after a new version goes live; health, metrics and error paths."""

from __future__ import annotations

import http.client
import json
from typing import Any

import numpy as np
import pytest
import redis

from pipeline.codec.hashing import hash64
from pipeline.codec.samplebatch import from_rows
from pipeline.codec.slots import SlotConfig
from pipeline.config import KafkaSettings
from pipeline.kafka import producer
from pipeline.model.modules import build_model, dense_state
from pipeline.model.spec import ModelSpec
from pipeline.ps.client import PSClient, TableRoute
from pipeline.ps.dense import push_dense
from pipeline.ps.spec import TableSpec
from pipeline.publish.publisher import Publisher
from pipeline.publish.serve import Server
from pipeline.publish.subscriber import Subscriber
from pipeline.train.infer import Inferencer
from tests.psservers import shard_servers

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHARDS = 2
T0 = 1_700_000_000
SLOTS = ("C1", "user_id", "tags")


def _table(name: str, dim: int) -> TableSpec:
    return TableSpec.from_dict(
        {
            "name": name,
            "dim": dim,
            "initializer": {"kind": "normal", "std": 0.1, "seed": 3},
            "optimizer": {"kind": "adagrad", "lr": 0.3},
            "accessor": {"admit_threshold": 0.15},  # a second show admits a row
            "serving": {"fp16": False},  # serving must equal the PS rows exactly
        }
    )


def _call(server: Server, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data)
        resp = conn.getresponse()
        raw = resp.read()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, json.loads(raw) if ctype == "application/json" else raw.decode()
    finally:
        conn.close()


# Raw values: some trained twice (admitted), some once (not admitted), some never seen.
TRAINED: dict[str, list[Any]] = {
    "C1": ["68fd1e64", "05db9164", ""],
    "user_id": [17, 18, 19],
    "tags": ["a", "b", 7],
}
ONCE: dict[str, list[Any]] = {"C1": ["be589b51"], "user_id": [20], "tags": ["c"]}
ROWS: list[dict[str, Any]] = [
    {"features": {"C1": "68fd1e64", "user_id": 17, "tags": ["a", "b", 7]}, "dense": [1.0, 0.5]},
    {"features": {"C1": "05db9164", "user_id": "18", "tags": ["c"]}, "dense": [0.0, -1.0]},
    {"features": {"C1": "be589b51", "user_id": 20}, "dense": [2.0, 0.0]},
    {"features": {"C1": "", "user_id": 99, "tags": None}, "dense": [0.0, 0.0]},
    {"features": {"C1": "never-seen"}, "dense": [0.3, 0.3]},
    {"dense": [0.0, 0.0]},
]


def _reference(spec: ModelSpec, ps: PSClient) -> np.ndarray:
    """What the trainer's model computes from the PS for ROWS (same hashing, from_rows)."""
    features = [
        {
            s: [hash64(s, v) for v in (vals if isinstance(vals, list) else [vals])]
            for s, vals in row.get("features", {}).items()
            if vals is not None
        }
        for row in ROWS
    ]
    batch = from_rows(
        SlotConfig(SLOTS, 2),
        np.zeros(len(ROWS)),
        features,
        np.zeros(len(ROWS), np.int64),
        dense=[row["dense"] for row in ROWS],
    )
    return Inferencer(spec, ps).score(batch)


def test_serving_equals_the_trainers_model_on_the_ps(
    redis_url: str, kafka_bootstrap: str, project_topics: dict[str, str], unique: str
) -> None:
    wide, deep = _table(f"w{unique}", 1), _table(f"d{unique}", 4)
    spec = ModelSpec(
        name=f"m{unique}",
        kind="wide_deep",
        slots=SLOTS,
        dense_dim=2,
        wide_table=wide.name,
        deep_table=deep.name,
        deep_dim=4,
        hidden=(8,),
    )
    r = redis.Redis.from_url(redis_url)
    ps = PSClient(
        r, {wide.name: TableRoute(1, SHARDS), deep.name: TableRoute(4, SHARDS)}, trainer_id="t0"
    )
    rng = np.random.default_rng(0)
    topic = project_topics["model.updates"]
    publisher = Publisher(r, producer(KafkaSettings(bootstrap=kafka_bootstrap)), topic, spec)

    def push(raw: dict[str, list[Any]]) -> None:
        ids = np.array([hash64(s, v) for s, vals in raw.items() for v in vals], np.uint64)
        for table in (wide, deep):
            grads = rng.normal(size=(len(ids), table.dim)).astype(np.float32)
            ps.push(table.name, ids, grads, max_event_time=(T0 - 5) * 1000)
        ps.flush()

    sub = Subscriber.connect(KafkaSettings(bootstrap=kafka_bootstrap), topic, spec)
    try:
        with shard_servers(redis_url, [wide, deep], SHARDS), Server(sub) as server:
            # nothing published yet: not ready
            assert _call(server, "GET", "/health") == (
                503,
                {
                    "status": "no_model",
                    "model": spec.name,
                    "model_version": None,
                    "freshness_ms": None,
                },
            )
            status, body = _call(server, "POST", "/predict", {"rows": ROWS})
            assert status == 503 and "no model version" in body["error"]

            push(TRAINED)
            push(TRAINED)
            push(ONCE)
            push_dense(r, spec.dense_table_name(), dense_state(build_model(spec, seed=1)))
            assert publisher.publish().version == 1
            server.wait_for_version(1)
            status, body = _call(server, "POST", "/predict", {"rows": ROWS})
            assert status == 200, body
            assert body["model_version"] == 1 and body["freshness_ms"] > 0
            expected = _reference(spec, ps)
            np.testing.assert_allclose(body["predictions"], expected, rtol=1e-6, atol=1e-6)
            assert len(set(np.round(expected, 6))) == len(ROWS)  # rows really differ

            # a new version: more training, new dense parameters -> served after it goes live
            push(TRAINED)
            push(ONCE)  # second show admits these
            push_dense(r, spec.dense_table_name(), dense_state(build_model(spec, seed=2)))
            assert publisher.publish().version == 2
            server.wait_for_version(2)
            status, body = _call(server, "POST", "/predict", {"rows": ROWS})
            assert status == 200 and body["model_version"] == 2
            expected2 = _reference(spec, ps)
            np.testing.assert_allclose(body["predictions"], expected2, rtol=1e-6, atol=1e-6)
            assert not np.allclose(expected, expected2, atol=1e-4)

            status, health = _call(server, "GET", "/health")
            assert status == 200 and health["status"] == "ok" and health["model_version"] == 2

            # error paths
            status, body = _call(server, "POST", "/predict", b"{not json")
            assert status == 400 and "not valid JSON" in body["error"]
            status, body = _call(server, "POST", "/predict", b'{"rows": [{"dense": [NaN, 0]}]}')
            assert status == 400 and "NaN" in body["error"]
            bad_slot = {"rows": [{"features": {"C99": "x"}, "dense": [0, 0]}]}
            status, body = _call(server, "POST", "/predict", bad_slot)
            assert status == 400 and "unknown slot 'C99'" in body["error"]
            status, body = _call(server, "POST", "/predict", {"rows": [{"dense": [1.0]}]})
            assert status == 400 and "list of 2 numbers, got 1 values" in body["error"]
            assert _call(server, "GET", "/nope")[0] == 404

            status, text = _call(server, "GET", "/metrics")
            assert status == 200
            assert "pipeline_serve_model_version 2.0" in text
            assert 'pipeline_serve_versions_total{status="applied"} 2.0' in text
            assert 'pipeline_serve_requests_total{code="200",endpoint="/predict"} 2.0' in text
            assert 'pipeline_serve_requests_total{code="400",endpoint="/predict"} 4.0' in text
            assert 'pipeline_serve_requests_total{code="503",endpoint="/predict"} 1.0' in text
            assert 'pipeline_serve_errors_total{reason="bad_request"} 2.0' in text
            assert "pipeline_serve_predict_latency_seconds_count 2.0" in text
            assert f"pipeline_serve_rows_total {2.0 * len(ROWS)}" in text
            fresh = float(text.split("\npipeline_serve_freshness_seconds ")[1].split()[0])
            assert fresh > 0
    finally:
        sub.close()
        publisher.release()
