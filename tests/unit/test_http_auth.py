"""The HTTP listeners: loopback by default, bearer-token auth when a token is set (401
with WWW-Authenticate otherwise), /health open, and malformed requests answered 4xx."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from pipeline.httpauth import CHALLENGE, authorized
from pipeline.model.modules import build_model, dense_state
from pipeline.model.spec import ModelSpec
from pipeline.publish.serve import Server
from pipeline.publish.subscriber import LiveModel, Subscriber
from pipeline.train.metrics_sink import PrometheusExporter

pytestmark = pytest.mark.unit

TOKEN = "t0k3n-with-enough-entropy"


def _get(
    host: str, port: int, path: str, token: str | None = None, method: str = "GET", body: Any = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    conn.request(method, path, body, headers)
    resp = conn.getresponse()
    out = resp.status, dict(resp.getheaders()), resp.read()
    conn.close()
    return out


def test_bearer_check() -> None:
    assert authorized(None, None) and authorized("anything", None)
    assert authorized(f"Bearer {TOKEN}", TOKEN) and authorized(f"bearer  {TOKEN} ", TOKEN)
    for header in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer "):
        assert not authorized(header, TOKEN), header


def test_exporter_binds_loopback_by_default_and_checks_the_token() -> None:
    with PrometheusExporter(0, "t1", "job") as open_exporter:
        assert open_exporter.addr == "127.0.0.1"
        assert open_exporter._server._http.server_address[0] == "127.0.0.1"
        status, _, body = _get("127.0.0.1", open_exporter.port or 0, "/metrics")
        assert status == 200 and b"pipeline_train_auc" in body
    exporter = PrometheusExporter(0, "t1", "job", token=TOKEN).start()
    try:
        port = exporter.port or 0
        status, headers, _ = _get("127.0.0.1", port, "/metrics")
        assert status == 401 and headers["WWW-Authenticate"] == CHALLENGE
        assert _get("127.0.0.1", port, "/metrics", "wrong")[0] == 401
        status, _, body = _get("127.0.0.1", port, "/metrics", TOKEN)
        assert status == 200 and b"pipeline_train_auc" in body
        assert _get("127.0.0.1", port, "/health")[0] == 200  # probes need no secret
        assert _get("127.0.0.1", port, "/other", TOKEN)[0] == 404
    finally:
        exporter.close()


@pytest.fixture
def live_server() -> Iterator[Server]:
    spec = ModelSpec(name="m", kind="lr", slots=("C1",), dense_dim=0)
    module = build_model(spec)
    module.eval()
    sub = Subscriber(spec, clock_ms=lambda: 5_000)
    sub.live = LiveModel(
        1,
        {"max_event_time": 2_000},
        {"wide": (np.zeros(0, np.uint64), np.zeros((0, 1), np.float32))},
        dense_state(module),
        module,
    )
    with Server(sub, follow=False, token=TOKEN) as server:
        yield server


def test_serve_binds_loopback_by_default() -> None:
    from pipeline.config import load
    from pipeline.publish.settings import ServeSettings

    assert load(ServeSettings).host == "127.0.0.1"
    spec = ModelSpec(name="m", kind="lr", slots=("C1",), dense_dim=0)
    assert Server(Subscriber(spec), follow=False).host == "127.0.0.1"


def test_serve_requires_the_token_on_predict_and_metrics(live_server: Server) -> None:
    host, port = live_server.host, live_server.port
    body = json.dumps({"rows": [{"features": {"C1": "x"}}]})
    for path, method in (("/predict", "POST"), ("/metrics", "GET")):
        for token in (None, "wrong"):
            status, headers, answer = _get(host, port, path, token, method, body)
            assert status == 401, (path, token)
            assert headers["WWW-Authenticate"] == CHALLENGE
            assert json.loads(answer) == {"error": "a valid bearer token is required"}
    status, _, answer = _get(host, port, "/predict", TOKEN, "POST", body)
    assert status == 200 and json.loads(answer)["predictions"] == [0.5]
    status, _, answer = _get(host, port, "/metrics", TOKEN)
    assert status == 200 and b'pipeline_serve_requests_total{code="401"' in answer
    status, _, answer = _get(host, port, "/health")  # open: probes and load balancers
    assert status == 200 and json.loads(answer)["model_version"] == 1


@pytest.mark.parametrize(
    "body",
    [
        "[" * 100_000 + "]" * 100_000,  # deeper than the JSON parser recurses
        '{"rows": ' + "[" * 50_000 + "]" * 50_000 + "}",
        '{"rows": [{"features": {"C1": ' + "[" * 5_000 + "]" * 5_000 + "}}]}",
        "\xff\xfe not utf-8",
        '{"rows": [{"features": {"C1": ' + "1" * 5_000 + "}}]}",  # beyond int digits limit
        '{"rows": [{"dense": [NaN]}]}',
    ],
    ids=["nested-array", "nested-rows", "nested-feature", "not-utf8", "huge-int", "nan"],
)
def test_malformed_predict_requests_are_4xx_never_500(live_server: Server, body: str) -> None:
    data = body.encode("latin-1") if body.startswith("\xff") else body.encode()
    status, _, answer = _get(live_server.host, live_server.port, "/predict", TOKEN, "POST", data)
    assert 400 <= status < 500, (status, answer[:200])
    assert "error" in json.loads(answer)
