"""PSClient: what trainers (and serving) use to reach the parameter server.

Pull: ids are routed to shards and read with one MGET per shard, all shards in
one pipelined round trip; misses come back as zeros plus a miss mask. Push: one
stream entry per shard, after a back-pressure check (a trainer waits while
``max_inflight`` of its pushes are not yet applied, which bounds staleness).
Works with ``redis.Redis`` and ``redis.RedisCluster`` (keys are hash-tagged).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.ps import dense as dense_io
from pipeline.ps import resp
from pipeline.ps.gradstream import Push, StreamEntryError, encode_push, stream_id_tuple
from pipeline.ps.keys import ShardKeys, split_by_shard
from pipeline.ps.pullview import decode_rows

__all__ = ["BackPressureTimeout", "PSClient", "PushReceipt", "TableRoute", "registry_key"]


class BackPressureTimeout(PipelineError):
    """A shard's stream stayed full: its server is down or far behind."""


def registry_key(table: str) -> bytes:
    """Where a shard server announces a table's dim and shard count."""
    return f"ps:table:{{{table}}}".encode()


@dataclass(frozen=True)
class TableRoute:
    """What a client must know of a table: its dim and shard count."""

    dim: int
    shards: int


@dataclass
class PushReceipt:
    """Stream entry ids of one push, per shard (for wait-until-applied)."""

    table: str
    entries: dict[int, bytes] = field(default_factory=dict)


def _is_single_node(client: Any) -> bool:
    import redis

    return isinstance(client, redis.Redis)


class PSClient:
    """Routes pulls and pushes of sparse rows to shards through Redis."""

    def __init__(
        self,
        client: Any,
        routes: Mapping[str, TableRoute] | None = None,
        trainer_id: str = "trainer-0",
        max_inflight: int = 8,
        backpressure_timeout_s: float = 120.0,
    ) -> None:
        self.redis = client
        self.routes: dict[str, TableRoute] = dict(routes or {})
        self.trainer_id = trainer_id
        if max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        self.max_inflight = max_inflight
        self._inflight: deque[PushReceipt] = deque()
        self.backpressure_timeout_s = backpressure_timeout_s
        self._seq = 0
        # Plain (non-cluster) clients expose a connection pool we can send raw RESP on.
        self._raw_pool = (
            getattr(client, "connection_pool", None) if _is_single_node(client) else None
        )
        self._keys: dict[tuple[str, int], ShardKeys] = {}
        self.backpressure_waits = 0

    # -- routing -----------------------------------------------------------
    def route(self, table: str) -> TableRoute:
        """The table's route, discovered from the servers' registry on first use."""
        if table not in self.routes:
            raw = self.redis.get(registry_key(table))
            if raw is None:
                raise PipelineError(f"unknown table {table!r}: no shard server has registered it")
            info = json.loads(raw)
            self.routes[table] = TableRoute(int(info["dim"]), int(info["shards"]))
        return self.routes[table]

    def keys(self, table: str, shard: int) -> ShardKeys:
        key = (table, shard)
        if key not in self._keys:
            self._keys[key] = ShardKeys(table, shard)
        return self._keys[key]

    # -- pull --------------------------------------------------------------
    def pull(self, table: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(weights float32[n, dim], found bool[n]) for ``ids``; misses are zeros."""
        route = self.route(table)
        ids = np.asarray(ids, dtype=np.uint64)
        if len(ids) == 0:
            return np.zeros((0, route.dim), np.float32), np.zeros(0, bool)
        if route.shards == 1 and self._raw_pool is not None:
            return decode_rows(
                self._raw_mget([self.keys(table, 0).mget_command(ids)])[0], route.dim
            )
        weights = np.zeros((len(ids), route.dim), dtype=np.float32)
        found = np.zeros(len(ids), dtype=bool)
        parts = [(s, pos) for s, pos in enumerate(split_by_shard(ids, route.shards)) if len(pos)]
        if not parts:
            return weights, found
        if self._raw_pool is not None:
            replies = self._raw_mget(
                [self.keys(table, s).mget_command(ids[pos]) for s, pos in parts]
            )
        else:  # Redis Cluster: let redis-py route each MGET to its node
            pipe = self.redis.pipeline(transaction=False)
            for shard, pos in parts:
                # execute_command: cluster pipelines refuse .mget(); one slot per shard here
                pipe.execute_command("MGET", *self.keys(table, shard).pull_keys(ids[pos]))
            replies = pipe.execute()
        for (_, pos), values in zip(parts, replies, strict=True):
            weights[pos], found[pos] = decode_rows(values, route.dim)
        return weights, found

    def _raw_mget(self, commands: list[bytes]) -> list[list[bytes | None]]:
        """Send pre-encoded MGETs in one round trip on a pooled connection; read the replies."""
        assert self._raw_pool is not None
        return resp.send(self._raw_pool, commands)

    # -- push --------------------------------------------------------------
    def _validate(
        self,
        route: TableRoute,
        ids: np.ndarray,
        values: np.ndarray,
        shows: np.ndarray,
        clicks: np.ndarray,
    ) -> None:
        n = len(ids)
        if values.shape != (n, route.dim):
            raise StreamEntryError(
                "wrong_dim", f"values {values.shape}, expected ({n}, {route.dim})"
            )
        if len(shows) != n or len(clicks) != n:
            raise StreamEntryError(
                "length_mismatch", f"ids {n}, shows {len(shows)}, clicks {len(clicks)}"
            )
        if not (
            np.isfinite(values).all() and np.isfinite(shows).all() and np.isfinite(clicks).all()
        ):
            raise StreamEntryError("non_finite", "values, shows or clicks contain NaN or inf")

    def _wait_for_room(self) -> None:
        """Back-pressure: wait until at most ``max_inflight - 1`` of our pushes are unapplied.

        Counting our own unapplied pushes (rather than stream length, which
        includes applied entries kept for replay) bounds staleness exactly: no
        trainer runs more than ``max_inflight`` pushes ahead of the servers.
        """
        while len(self._inflight) >= self.max_inflight:
            oldest = self._inflight[0]
            try:
                self.wait_applied(oldest, timeout_s=self.backpressure_timeout_s)
            except TimeoutError as exc:
                raise BackPressureTimeout(
                    f"{exc}: is every shard server of {oldest.table!r} running?"
                ) from None
            self._inflight.popleft()
            self.backpressure_waits += 1

    def push(
        self,
        table: str,
        ids: np.ndarray,
        values: np.ndarray,
        shows: np.ndarray | None = None,
        clicks: np.ndarray | None = None,
        kind: str = "grad",
        max_event_time: int = 0,
        offsets: dict[str, dict[str, int]] | None = None,
    ) -> PushReceipt:
        """Append gradients (``grad``) or parameter deltas (``delta``) to each shard's stream.

        Validates everything before writing anything: a bad push raises
        :class:`StreamEntryError` and nothing reaches any shard.
        """
        route = self.route(table)
        ids = np.asarray(ids, dtype=np.uint64)
        values = (
            np.asarray(values, dtype=np.float32).reshape(len(ids), -1)
            if len(ids)
            else np.zeros((0, route.dim), dtype=np.float32)
        )
        shows = np.ones(len(ids), np.float32) if shows is None else np.asarray(shows, np.float32)
        clicks = (
            np.zeros(len(ids), np.float32) if clicks is None else np.asarray(clicks, np.float32)
        )
        self._validate(route, ids, values, shows, clicks)
        self._seq += 1
        parts = [(s, pos) for s, pos in enumerate(split_by_shard(ids, route.shards)) if len(pos)]
        streams = [self.keys(table, s).stream for s, _ in parts]
        self._wait_for_room()
        pipe = self.redis.pipeline(transaction=False)
        for (_shard, pos), stream in zip(parts, streams, strict=True):
            entry = Push(
                kind,
                self.trainer_id,
                self._seq,
                ids[pos],
                values[pos],
                shows[pos],
                clicks[pos],
                max_event_time,
                offsets or {},
            )
            pipe.xadd(stream, encode_push(entry))
        receipt = PushReceipt(table)
        for (shard, _), entry_id in zip(parts, pipe.execute(), strict=True):
            receipt.entries[shard] = entry_id
        self._inflight.append(receipt)
        return receipt

    def barrier(
        self, table: str, name: str, offsets: dict[str, dict[str, int]] | None = None
    ) -> PushReceipt:
        """Place a barrier entry in every shard's stream (a consistent cut for snapshots)."""
        route = self.route(table)
        self._seq += 1
        empty = np.zeros(0, np.float32)
        receipt = PushReceipt(table)
        pipe = self.redis.pipeline(transaction=False)
        for shard in range(route.shards):
            entry = Push(
                "barrier",
                self.trainer_id,
                self._seq,
                np.zeros(0, np.uint64),
                np.zeros((0, 0), np.float32),
                empty,
                empty,
                0,
                offsets or {},
                name,
            )
            pipe.xadd(self.keys(table, shard).stream, encode_push(entry))
        for shard, entry_id in enumerate(pipe.execute()):
            receipt.entries[shard] = entry_id
        return receipt

    def applied(self, table: str, shard: int) -> tuple[int, int]:
        """The last stream id the shard's server has applied ((0, 0) before any)."""
        raw = self.redis.hget(self.keys(table, shard).meta, b"applied")
        return stream_id_tuple(raw) if raw else (0, 0)

    def _applied_many(self, table: str, shards: list[int]) -> list[tuple[int, int]]:
        """The last applied stream id of each of ``shards`` in one round trip."""
        if len(shards) == 1:
            return [self.applied(table, shards[0])]
        pipe = self.redis.pipeline(transaction=False)
        for shard in shards:
            pipe.hget(self.keys(table, shard).meta, b"applied")
        return [stream_id_tuple(raw) if raw else (0, 0) for raw in pipe.execute()]

    def is_applied(self, receipt: PushReceipt) -> bool:
        """Whether every shard has applied its entry of ``receipt`` (no waiting)."""
        shards = sorted(receipt.entries)
        done = self._applied_many(receipt.table, shards)
        want = [stream_id_tuple(receipt.entries[s]) for s in shards]
        return all(d >= w for d, w in zip(done, want, strict=True))

    def wait_applied(self, receipt: PushReceipt, timeout_s: float = 30.0) -> None:
        """Block until every shard has applied its entry of ``receipt``.

        Polls every shard in one round trip, first after 0.2 ms, backing off to 5 ms:
        synchronous steps wait here once per batch, so the first polls must be quick.
        """
        deadline = time.monotonic() + timeout_s
        pending = {s: stream_id_tuple(e) for s, e in receipt.entries.items()}
        delay = 0.0002
        while pending:
            shards = sorted(pending)
            done = self._applied_many(receipt.table, shards)
            pending = {s: pending[s] for s, d in zip(shards, done, strict=True) if d < pending[s]}
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"shards {sorted(pending)} of {receipt.table} did not apply in {timeout_s:g} s"
                )
            time.sleep(delay)
            delay = min(1.5 * delay, 0.005)

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until every push of this client is applied."""
        while self._inflight:
            self.wait_applied(self._inflight[0], timeout_s)
            self._inflight.popleft()

    # -- dense -------------------------------------------------------------
    def pull_dense(self, name: str) -> tuple[int, dict[str, np.ndarray]]:
        """(version, tensors) of a dense table."""
        return dense_io.pull_dense(self.redis, name)

    def dense_version(self, name: str) -> int:
        """The dense table's version (0 when it does not exist)."""
        return dense_io.dense_version(self.redis, name)

    def push_dense(
        self, name: str, tensors: Mapping[str, np.ndarray], expected_version: int | None = None
    ) -> int:
        """Write a new dense version (optimistic concurrency when ``expected_version`` is given)."""
        return dense_io.push_dense(self.redis, name, tensors, expected_version)
