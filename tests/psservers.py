"""Test helper: parameter-server shard servers running in threads of the test process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from pipeline.ps.catalog import load_catalog
from pipeline.ps.server import ServerOptions, ShardServer
from pipeline.ps.spec import TableSpec

__all__ = ["catalog_tables", "shard_servers"]


def catalog_tables(tag: str) -> dict[str, TableSpec]:
    """The default catalog's tables renamed ``<tag>_<name>``, by name (one test's own tables)."""
    out = {}
    for spec in load_catalog():
        data = spec.to_dict()
        data["name"] = f"{tag}_{spec.name}"
        out[data["name"]] = TableSpec.from_dict(data)
    return out


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


def main() -> None:
    """One shard server in this process with a fixed clock, until SIGTERM.

    ``python -m tests.psservers URL SPEC_JSON DATA_DIR NOW [--budget N] [--max-delta-rows N]
    [--compact-fraction F] [--interval S]``: for tests that SIGKILL a server and compare
    its table bit for bit with a reference (``last_seen`` must not depend on wall time).
    """
    import argparse
    import json
    import signal
    from pathlib import Path

    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("spec")
    parser.add_argument("data_dir")
    parser.add_argument("now", type=int)
    parser.add_argument("--budget", type=int, default=None)
    parser.add_argument("--max-delta-rows", type=int, default=65_536)
    parser.add_argument("--compact-fraction", type=float, default=0.5)
    parser.add_argument("--interval", type=float, default=30.0)
    args = parser.parse_args()
    options = ServerOptions(
        data_dir=Path(args.data_dir),
        hot_budget_rows=args.budget,
        checkpoint_interval_s=args.interval,
        max_delta_rows=args.max_delta_rows,
        compact_fraction=args.compact_fraction,
        block_ms=20,
        cold_block_cache_bytes=8 << 20,
    )
    spec = TableSpec.from_dict(json.loads(args.spec))
    server = ShardServer(
        redis.Redis.from_url(args.url), [spec], 0, 1, options, clock=lambda: args.now
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        server.run(stop)
    finally:
        server.close()


if __name__ == "__main__":
    main()
