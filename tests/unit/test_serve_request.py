"""Predict requests: raw values hashed exactly as training hashes them, clear errors for
bad rows, and scores of a hand-built live model checked against a numpy reference."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from pipeline.codec.hashing import hash64
from pipeline.ingest.adapters.base import hash_single
from pipeline.model.modules import build_model, dense_state
from pipeline.model.spec import ModelSpec
from pipeline.publish.predict import RequestError, parse_request, parse_rows, score
from pipeline.publish.subscriber import LiveModel

pytestmark = pytest.mark.unit

SPEC = ModelSpec(name="m", kind="lr", slots=("C1", "user_id", "tags"), dense_dim=2)


def _ids(batch: Any, slot: str, row: int) -> list[int]:
    return [int(i) for i in batch.row_features(row).get(slot, [])]


def test_raw_values_hash_like_training() -> None:
    rows = [
        {"features": {"C1": "68fd1e64", "user_id": 17, "tags": ["a", "b", 3]}, "dense": [1, 2.5]},
        {"features": {"C1": None, "user_id": "17", "tags": []}, "dense": [0, 0]},
        {"features": {"C1": ""}, "dense": [0, 0]},
        {"dense": [0, 0]},
    ]
    batch = parse_rows(rows, SPEC)
    assert batch.num_rows == 4
    # strings as the Criteo adapter hashes them, ints by their decimal digits
    assert _ids(batch, "C1", 0) == hash_single("C1", ["68fd1e64"]).ids.tolist()
    assert _ids(batch, "user_id", 0) == [hash64("user_id", 17)] == _ids(batch, "user_id", 1)
    assert _ids(batch, "tags", 0) == [hash64("tags", "a"), hash64("tags", "b"), hash64("tags", 3)]
    assert _ids(batch, "C1", 1) == [] and _ids(batch, "tags", 1) == []  # null, empty list
    assert _ids(batch, "C1", 2) == [hash64("C1", "")]  # a value, as in the joiner
    assert all(_ids(batch, s, 3) == [] for s in SPEC.slots)  # absent slots: no ids
    np.testing.assert_array_equal(batch.dense[0], np.array([1, 2.5], np.float32))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([], "expected a JSON object"),
        ({"rows": []}, "non-empty list"),
        ({"rows": [{}], "extra": 1}, "unknown request fields"),
        ({"rows": [1]}, "row 0: expected an object"),
        ({"rows": [{"dense": [0, 0], "label": 1}]}, "unknown fields"),
        ({"rows": [{"features": {"C9": "x"}, "dense": [0, 0]}]}, "unknown slot 'C9'"),
        ({"rows": [{"features": {"C1": 1.5}, "dense": [0, 0]}]}, "got number 1.5"),
        ({"rows": [{"features": {"C1": True}, "dense": [0, 0]}]}, "got boolean"),
        ({"rows": [{"features": {"C1": {"a": 1}}, "dense": [0, 0]}]}, "got object"),
        ({"rows": [{"features": ["C1"], "dense": [0, 0]}]}, "'features' must be an object"),
        ({"rows": [{"features": {}}]}, "'dense' is required: 2 numbers"),
        ({"rows": [{"dense": [0, 0, 0]}]}, "list of 2 numbers, got 3 values"),
        ({"rows": [{"dense": "01"}]}, "got string"),
        ({"rows": [{"dense": [0, float("nan")]}]}, "finite numbers"),
        ({"rows": [{"dense": [0, True]}]}, "finite numbers"),
        ({"rows": [{"dense": [0, 0]}] * 3}, "3 rows in one request; the limit is 2"),
    ],
)
def test_bad_requests_say_what_is_wrong(payload: Any, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        parse_request(payload, SPEC, max_rows=2)


def test_score_matches_a_numpy_reference_and_unadmitted_ids_read_zero() -> None:
    rng = np.random.default_rng(0)
    spec = ModelSpec(name="m", kind="lr", slots=("C1", "user_id"), dense_dim=2)
    known: dict[tuple[str, str | int], float] = {
        ("C1", "x"): 0.7,
        ("C1", "y"): -0.2,
        ("user_id", 5): 1.1,
    }
    ids = np.array([hash64(s, v) for s, v in known], np.uint64)
    order = np.argsort(ids)
    weights = np.array(list(known.values()), np.float32)[:, None]
    module = build_model(spec)
    state = dense_state(module)
    state["bias"] = np.array([-0.3], np.float32)
    state["dense_linear.weight"] = rng.normal(size=(1, 2)).astype(np.float32)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    module.eval()
    live = LiveModel(1, {}, {spec.wide_table: (ids[order], weights[order])}, state, module)
    rows = [
        {"features": {"C1": ["x", "y"], "user_id": 5}, "dense": [1.0, -2.0]},
        {"features": {"C1": "never-seen", "user_id": 6}, "dense": [0.5, 0.5]},
        {"features": {}, "dense": [0.0, 0.0]},
    ]
    got = score(live, spec, parse_rows(rows, spec))
    w = state["dense_linear.weight"][0]
    logits = np.array(
        [
            -0.3 + 0.7 - 0.2 + 1.1 + w @ [1.0, -2.0],
            -0.3 + w @ [0.5, 0.5],  # unknown ids contribute nothing
            -0.3,
        ]
    )
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-logits)), rtol=1e-6, atol=1e-7)


def test_http_paths_without_a_broker() -> None:
    """The HTTP layer over a subscriber fed by hand: 503 until a version is live, then
    keep-alive predictions, 411 without Content-Length, 413 over the body limit."""
    import http.client
    import json
    import socket

    from pipeline.publish.serve import Server
    from pipeline.publish.subscriber import Subscriber

    spec = ModelSpec(name="m", kind="lr", slots=("C1",), dense_dim=0)
    module = build_model(spec)
    module.eval()
    empty = (np.zeros(0, np.uint64), np.zeros((0, 1), np.float32))
    sub = Subscriber(spec, clock_ms=lambda: 5_000)
    with Server(sub, follow=False, max_body_bytes=200) as server:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
        body = json.dumps({"rows": [{"features": {"C1": "x"}}]})
        conn.request("POST", "/predict", body)
        resp = conn.getresponse()
        assert resp.status == 503 and b"no model version" in resp.read()
        sub.live = LiveModel(
            3, {"max_event_time": 2_000}, {"wide": empty}, dense_state(module), module
        )
        for _ in range(2):  # the same connection twice: keep-alive works
            conn.request("POST", "/predict", body)
            resp = conn.getresponse()
            assert resp.status == 200
            got = json.loads(resp.read())
            assert got == {"predictions": [0.5], "model_version": 3, "freshness_ms": 3_000}
        conn.request("POST", "/predict", json.dumps({"rows": [{}] * 100}))
        resp = conn.getresponse()
        assert resp.status == 413 and "limit is 200" in json.loads(resp.read())["error"]
        conn.close()
        with socket.create_connection((server.host, server.port), timeout=5) as raw:
            raw.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n\r\n")
            assert raw.recv(4096).startswith(b"HTTP/1.1 411 ")
