"""Test helper: a local Redis Cluster of real ``redis-server`` processes (3 masters).

Each node runs with ``cluster-enabled yes`` in its own temp directory and its own
process group, owned by :func:`redis_cluster`: every node is killed when the
cluster cannot be formed and on exit, whatever happened in between. The cluster
is formed with redis-py (``CLUSTER ADDSLOTS`` on each node, ``CLUSTER MEET``),
so only ``redis-server`` is needed, and it is ready once every node reports
``cluster_state:ok`` with all 16384 slots assigned and every master known.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from pipeline.stack import find_redis_binary, port_in_use

__all__ = ["ClusterNodes", "redis_cluster"]

SLOTS = 16384
BUS_OFFSET = 10_000  # a node's cluster bus listens on its port + 10000


@dataclass(frozen=True)
class ClusterNodes:
    """A running cluster: its nodes' ports and a URL any cluster client can start from."""

    ports: list[int]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def node_of_slot(self, slot: int) -> int:
        """Index of the node serving ``slot`` (slots are split in equal ranges)."""
        return slot * len(self.ports) // SLOTS


def _ports(count: int) -> list[int]:
    """``count`` ports p with p and its bus port p + 10000 free (not ephemeral-range ones,
    whose bus port would pass 65535)."""
    start = random.randrange(30_000, 50_000)
    ports: list[int] = []
    for port in range(start, 55_000):
        if not port_in_use("127.0.0.1", port) and not port_in_use("127.0.0.1", port + BUS_OFFSET):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"no {count} free port pairs (p, p + {BUS_OFFSET}) from {start}")


def _start_node(binary: str, port: int, directory: Path) -> subprocess.Popen[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        "5000",
        "--dir",
        str(directory),
        "--save",
        "",
        "--appendonly",
        "no",
        "--logfile",
        str(directory / "redis.log"),
    ]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)


def _wait(
    what: str, done: Callable[[], object], timeout: float, procs: list[subprocess.Popen[bytes]]
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if done():
                return
        except redis.ConnectionError:
            pass
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"Redis Cluster: timed out waiting for {what}")
        time.sleep(0.05)


def _info(port: int) -> dict[str, str]:
    with redis.Redis(port=port, socket_timeout=2, decode_responses=True) as node:
        info = node.cluster("INFO")  # redis-py parses the reply into a dict
    return {str(key): str(value) for key, value in info.items()}


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@contextmanager
def redis_cluster(base: Path, masters: int = 3, timeout: float = 60.0) -> Iterator[ClusterNodes]:
    """Start ``masters`` cluster nodes under ``base``, form the cluster, stop it on exit."""
    binary = find_redis_binary()
    ports = _ports(masters)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            procs.append(_start_node(binary, port, base / f"node-{port}"))
        for port in ports:
            _wait(f"node {port}", lambda p=port: redis.Redis(port=p).ping(), timeout, procs)
        nodes = [redis.Redis(port=port) for port in ports]
        for i, node in enumerate(nodes):  # equal ranges: node i serves [i*S/n, (i+1)*S/n)
            node.execute_command(
                "CLUSTER ADDSLOTS", *range(i * SLOTS // masters, (i + 1) * SLOTS // masters)
            )
        for port in ports[1:]:
            nodes[0].execute_command("CLUSTER MEET", "127.0.0.1", port)

        def ready() -> bool:
            for port in ports:
                info = _info(port)
                if (
                    info.get("cluster_state") != "ok"
                    or info.get("cluster_slots_ok") != str(SLOTS)
                    or info.get("cluster_known_nodes") != str(masters)
                ):
                    return False
            return True

        _wait("cluster_state:ok on every node", ready, timeout, procs)
        for node in nodes:
            node.close()
        yield ClusterNodes(ports)
    finally:
        _kill(procs)
