"""Reference online serving: an HTTP server over a :class:`Subscriber` that follows
``model.updates`` in a background thread.

``POST /predict`` scores rows with whatever version is live when the request arrives
(one ``LiveModel`` reference per request, so a response never mixes versions);
``GET /health`` says whether a version is loaded; ``GET /metrics`` is Prometheus text
from a private registry. With a ``token``, /predict and /metrics need
``Authorization: Bearer <token>`` (:mod:`pipeline.httpauth`); /health stays open for
probes and load balancers (it tells only the model name, version and freshness). A
request the server cannot use is answered 4xx with a reason, never 500. Standard
library HTTP (``ThreadingHTTPServer``), no new dependencies: it is the reference for
what a production server must compute, not a production server. Request format and
hashing: :mod:`pipeline.publish.predict`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pipeline.errors import PipelineError
from pipeline.httpauth import AUTH_HEADER, CHALLENGE, authorized
from pipeline.metricshttp import PROMETHEUS_TYPE, respond
from pipeline.publish.predict import RequestError, parse_request, score
from pipeline.publish.subscriber import LiveModel, Subscriber, VersionEvent

__all__ = ["Server"]

log = logging.getLogger(__name__)

#: Latency buckets of /predict in seconds (sub-millisecond to a second).
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


class _Metrics:
    """``pipeline_serve_*`` series in a registry of their own."""

    def __init__(self, server: Server) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pipeline_serve_requests", "HTTP requests", ["endpoint", "code"], registry=r
        )
        self.errors = Counter(
            "pipeline_serve_errors", "Requests answered with an error", ["reason"], registry=r
        )
        self.rows = Counter("pipeline_serve_rows", "Rows scored", registry=r)
        self.latency = Histogram(
            "pipeline_serve_predict_latency_seconds",
            "Time to answer a successful /predict request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.versions = Counter(
            "pipeline_serve_versions", "Model versions seen, by outcome", ["status"], registry=r
        )
        version = Gauge("pipeline_serve_model_version", "Live model version (0: none)", registry=r)
        version.set_function(lambda: float(server.live.version if server.live else 0))
        fresh = Gauge(
            "pipeline_serve_freshness_seconds",
            "Now minus the newest event time in the live version (NaN: unknown)",
            registry=r,
        )
        fresh.set_function(
            lambda: float("nan") if (ms := server.freshness_ms()) is None else ms / 1000
        )

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        out: bytes = generate_latest(self.registry)
        return out


class Server:
    """Serves the live model of ``subscriber`` over HTTP on ``host:port`` (0: a free port).

    With ``follow`` (the default) :meth:`start` also runs ``subscriber.run`` in a thread;
    without it the caller feeds the subscriber (``handle``/``poll``) itself.
    """

    def __init__(
        self,
        subscriber: Subscriber,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        follow: bool = True,
        max_rows: int = 10_000,
        max_body_bytes: int = 16 << 20,
        clock_ms: Callable[[], int] | None = None,
        token: str | None = None,
    ) -> None:
        if max_rows < 1 or max_body_bytes < 1:
            raise ValueError(
                f"max_rows and max_body_bytes must be >= 1: {max_rows}, {max_body_bytes}"
            )
        self.subscriber = subscriber
        self.spec = subscriber.model
        self.host = host
        self.requested_port = port
        self.follow = follow
        self.max_rows = max_rows
        self.max_body_bytes = max_body_bytes
        self.clock_ms = clock_ms or subscriber.clock_ms
        self.token = token
        self.metrics = _Metrics(self)
        chained = subscriber.on_version

        def on_version(event: VersionEvent, live: LiveModel | None) -> None:
            self.metrics.versions.labels(event.status).inc()
            if chained is not None:
                chained(event, live)

        subscriber.on_version = on_version
        self._stop = threading.Event()
        self._http: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []

    # -- state -----------------------------------------------------------------
    @property
    def live(self) -> LiveModel | None:
        return self.subscriber.live

    def freshness_ms(self, live: LiveModel | None = None) -> int | None:
        """Now minus the newest event time the live version was trained on (None: unknown)."""
        live = live or self.live
        if live is None:
            return None
        newest = int(live.manifest.get("max_event_time", 0))
        return self.clock_ms() - newest if newest > 0 else None

    @property
    def port(self) -> int:
        if self._http is None:
            raise RuntimeError("the server is not started")
        return int(self._http.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> Server:
        """Bind and serve in background threads (and follow model.updates with ``follow``)."""
        if self._http is not None:
            return self
        try:
            self._http = ThreadingHTTPServer((self.host, self.requested_port), _handler(self))
        except OSError as exc:
            raise PipelineError(
                f"cannot serve on {self.host}:{self.requested_port}: {exc}"
            ) from None
        self._http.daemon_threads = True
        self._stop.clear()
        threads = [threading.Thread(target=self._http.serve_forever, name="serve-http")]
        if self.follow:
            threads.append(threading.Thread(target=self._follow, name="serve-subscriber"))
        for t in threads:
            t.daemon = True
            t.start()
        self._threads = threads
        return self

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self.subscriber.run(self._stop)
            except Exception:  # keep serving the last good version; retry the stream
                log.exception("model.updates subscriber failed; retrying in 1 s")
                self._stop.wait(1.0)

    def wait_for_version(self, version: int = 1, timeout_s: float = 30.0) -> LiveModel:
        """Block until a version >= ``version`` is live; PipelineError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (live := self.live) is None or live.version < version:
            if time.monotonic() > deadline:
                have = "nothing" if live is None else f"version {live.version}"
                raise PipelineError(
                    f"model {self.spec.name!r}: version {version} not live after "
                    f"{timeout_s:g} s (have {have})"
                )
            time.sleep(0.02)
        return live

    def stop(self) -> None:
        """Stop serving and following (the subscriber stays open; close it yourself)."""
        self._stop.set()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        for t in self._threads:
            t.join(10)
        self._http, self._threads = None, []

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- endpoints ---------------------------------------------------------------
    def predict(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """``(HTTP status, JSON body)`` of a /predict request body."""
        t0 = time.perf_counter()
        live = self.live  # one version for the whole request
        if live is None:
            return 503, self._error("no_model", "no model version is loaded yet")
        try:
            payload = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            return 400, self._error("bad_json", f"body is not valid JSON: {exc}")
        except RecursionError:
            return 400, self._error("bad_json", "body is nested too deeply")
        try:
            batch = parse_request(payload, self.spec, self.max_rows)
        except RequestError as exc:
            return 400, self._error("bad_request", str(exc))
        except RecursionError:
            return 400, self._error("bad_request", "request is nested too deeply")
        predictions = score(live, self.spec, batch)
        self.metrics.rows.inc(batch.num_rows)
        self.metrics.latency.observe(time.perf_counter() - t0)
        return 200, {
            "predictions": predictions.tolist(),
            "model_version": live.version,
            "freshness_ms": self.freshness_ms(live),
        }

    def health(self) -> tuple[int, dict[str, Any]]:
        live = self.live
        body = {
            "model": self.spec.name,
            "model_version": live.version if live else None,
            "freshness_ms": self.freshness_ms(live),
        }
        return (200 if live else 503), {"status": "ok" if live else "no_model", **body}

    def _error(self, reason: str, message: str) -> dict[str, Any]:
        self.metrics.errors.labels(reason).inc()
        return {"error": message}


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``server``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: every response has a Content-Length
        # headers and body are two writes: with Nagle on, the body waits for the client's
        # delayed ACK and every response takes ~40 ms more
        disable_nagle_algorithm = True
        server_version = "pipeline-serve"

        def do_GET(self) -> None:
            if self.path == "/health":
                self._json("/health", *server.health())
            elif self.path == "/metrics":
                if self._authorized("/metrics"):
                    self._send("/metrics", 200, server.metrics.render(), PROMETHEUS_TYPE)
            else:
                self._json("other", 404, server._error("not_found", f"no such path {self.path}"))

        def do_POST(self) -> None:
            if self.path != "/predict":
                self._json("other", 404, server._error("not_found", f"no such path {self.path}"))
                return
            if not self._authorized("/predict"):
                return
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                status, body = 411, server._error("bad_request", "Content-Length is required")
            elif int(length) > server.max_body_bytes:
                self.close_connection = True  # the body is not read
                status, body = (
                    413,
                    server._error(
                        "too_large", f"body of {length} bytes; the limit is {server.max_body_bytes}"
                    ),
                )
            else:
                try:
                    status, body = server.predict(self.rfile.read(int(length)))
                except Exception as exc:
                    log.exception("predict failed")
                    status, body = 500, server._error("internal", f"internal error: {exc}")
            self._json("/predict", status, body)

        def _authorized(self, endpoint: str) -> bool:
            """True, or answers 401 (the body of a POST is not read: the connection closes)."""
            if authorized(self.headers.get(AUTH_HEADER), server.token):
                return True
            self.close_connection = True
            body = server._error("unauthorized", "a valid bearer token is required")
            self._json(endpoint, 401, body, {"WWW-Authenticate": CHALLENGE, "Connection": "close"})
            return False

        def _json(
            self,
            endpoint: str,
            status: int,
            body: dict[str, Any],
            headers: dict[str, str] | None = None,
        ) -> None:
            self._send(endpoint, status, json.dumps(body).encode(), "application/json", headers)

        def _send(
            self,
            endpoint: str,
            status: int,
            data: bytes,
            ctype: str,
            headers: dict[str, str] | None = None,
        ) -> None:
            server.metrics.requests.labels(endpoint, str(status)).inc()
            respond(self, status, data, ctype, headers)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    return Handler
