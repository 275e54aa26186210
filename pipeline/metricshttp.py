"""A small HTTP listener for Prometheus text: ``GET /metrics`` (bearer token when one is
set) and ``GET /health`` (always open, for probes), in a daemon thread.

The trainer's exporter uses it instead of ``prometheus_client.start_http_server``,
which has no authentication and binds every interface by default.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pipeline.httpauth import AUTH_HEADER, CHALLENGE, authorized

__all__ = ["PROMETHEUS_TYPE", "MetricsHTTPServer", "respond"]

log = logging.getLogger(__name__)

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsHTTPServer:
    """Serves ``render()`` on ``host:port`` (0: a free port) until :meth:`close`."""

    def __init__(
        self, host: str, port: int, render: Callable[[], bytes], token: str | None = None
    ) -> None:
        self._http = ThreadingHTTPServer((host, port), _handler(render, token))
        self._http.daemon_threads = True
        self._thread = threading.Thread(
            target=self._http.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._http.server_address[1])

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5)


def _handler(render: Callable[[], bytes], token: str | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "pipeline-metrics"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/health":
                self._send(200, b"ok\n", "text/plain")
            elif path != "/metrics":
                self._send(404, b"not found\n", "text/plain")
            elif not authorized(self.headers.get(AUTH_HEADER), token):
                self._send(401, b"a valid bearer token is required\n", "text/plain", CHALLENGE)
            else:
                self._send(200, render(), PROMETHEUS_TYPE)

        def _send(self, status: int, data: bytes, ctype: str, challenge: str = "") -> None:
            headers = {"WWW-Authenticate": challenge} if challenge else None
            respond(self, status, data, ctype, headers)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


def respond(
    handler: BaseHTTPRequestHandler,
    status: int,
    data: bytes,
    ctype: str,
    headers: dict[str, str] | None = None,
) -> None:
    """Write one whole response (status, ``headers``, type, length, body) on a
    :class:`http.server.BaseHTTPRequestHandler`."""
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Type", ctype)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
