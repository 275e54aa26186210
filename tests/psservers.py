"""Test helper: parameter-server shard servers running in threads of the test process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from pipeline.ps.server import ServerOptions, ShardServer
from pipeline.ps.spec import TableSpec

__all__ = ["shard_servers"]


@contextmanager
def shard_servers(
    url: str,
    specs: list[TableSpec],
    shards: int = 2,
    clock: Any = None,
    options: ServerOptions | None = None,
    wait_ready: bool = False,
) -> Iterator[list[ShardServer]]:
    """``shards`` servers, each with its own Redis connection; stopped and closed on exit.

    ``wait_ready`` blocks until every server has published its pull view (needed after
    a restore, before anything pulls).
    """
    kwargs = {"clock": clock} if clock else {}
    running = [
        ShardServer(
            redis.Redis.from_url(url),
            specs,
            s,
            shards,
            options or ServerOptions(block_ms=20),
            **kwargs,
        )
        for s in range(shards)
    ]
    stop = threading.Event()
    threads = [threading.Thread(target=s.run, args=(stop,), daemon=True) for s in running]
    for t in threads:
        t.start()
    try:
        if wait_ready:
            for s in running:
                assert s.ready.wait(20), "shard server did not start"
        yield running
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for s in running:
            s.close()
