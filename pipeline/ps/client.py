"""PSClient: what trainers (and serving) use to reach the parameter server.

Pull: ids are routed to shards and read with one MGET per shard, all shards in
one pipelined round trip; misses come back as zeros plus a miss mask. Push: one
stream entry per shard, after a back-pressure check (a trainer waits while
``max_inflight`` of its pushes are not yet applied, which bounds staleness).
Works with ``redis.Redis`` and ``redis.RedisCluster`` (keys are hash-tagged).

Outages (:mod:`pipeline.retry`): every call is retried with backoff while Redis is
away. A push is idempotent, so a retried one is never applied twice: each shard's
entry is added by a script that records ``pushed:<trainer>`` = "seq id" in the
shard's meta hash and returns the recorded id when the same seq comes again (the
reply of the first try was lost). A push is never lost either: the client keeps
the entries of its unapplied pushes, and when the record is gone or stale (Redis
lost its data: restarted without persistence, flushed) it waits for the shard
server to rebuild, then adds again every entry the server had not applied and the
stream no longer holds. Sequence numbers start at the clock's microseconds, so a
restarted trainer with the same id never reuses one.
"""

from __future__ import annotations

import json
import logging
import threading
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
from pipeline.retry import Outage, redis_errors, redis_where, retry_call

__all__ = [
    "BackPressureTimeout",
    "PSClient",
    "PushReceipt",
    "ShardsNotReady",
    "TableRoute",
    "registry_key",
]

log = logging.getLogger(__name__)

# KEYS: stream, meta; ARGV: trainer, seq, previous seq of this client on this shard
# ("0": do not check), then the entry's field/value pairs. Returns {id, lost}: lost = 1
# when the meta no longer records our previous push (Redis lost its data since).
_PUSH_SCRIPT = """
local field = 'pushed:' .. ARGV[1]
local lostf = 'lost:' .. ARGV[1]
local last = redis.call('HGET', KEYS[2], field)
local lost = 0
if last then
  local sep = string.find(last, ' ', 1, true)
  local seq = string.sub(last, 1, sep - 1)
  if seq == ARGV[2] then
    if redis.call('HEXISTS', KEYS[2], lostf) == 1 then lost = 1 end
    return {string.sub(last, sep + 1), lost}
  end
  if ARGV[3] ~= '0' and seq ~= ARGV[3] then lost = 1 end
elseif ARGV[3] ~= '0' then
  lost = 1
end
if lost == 1 then redis.call('HSET', KEYS[2], lostf, '1') end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 4))
redis.call('HSET', KEYS[2], field, ARGV[2] .. ' ' .. id)
return {id, lost}
"""


class BackPressureTimeout(PipelineError):
    """A shard's stream stayed full: its server is down or far behind."""


class ShardsNotReady(PipelineError):
    """No shard server registered a table, or not all of its shards came up, in time."""


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
    seq: int = 0
    #: the stream fields per shard, kept until applied (to add again after a Redis loss)
    fields: dict[int, dict[bytes, bytes]] = field(default_factory=dict)


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
        ready_timeout_s: float = 0.0,
        outage_give_up_s: float | None = None,
    ) -> None:
        self.redis = client
        self.routes: dict[str, TableRoute] = dict(routes or {})
        self.trainer_id = trainer_id
        if max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        self.max_inflight = max_inflight
        self._inflight: deque[PushReceipt] = deque()
        self.backpressure_timeout_s = backpressure_timeout_s
        #: how long :meth:`route` waits for a table's shard servers to register and come
        #: up (0: only the registry is checked, an unregistered table fails at once)
        self.ready_timeout_s = ready_timeout_s
        self.outage = Outage(f"redis at {redis_where(client)}", log)
        self.outage_give_up_s = outage_give_up_s
        # microseconds: a restarted trainer with the same id continues above its old seqs
        self._seq = time.time_ns() // 1000
        self._last: dict[tuple[str, int], tuple[int, bytes]] = {}  # our newest entry per shard
        self.recovered_entries = 0  # entries added again after Redis lost them
        self._recovering = threading.Lock()  # pushes (comm thread) and applies (caller)
        # Plain (non-cluster) clients expose a connection pool we can send raw RESP on.
        self._raw_pool = (
            getattr(client, "connection_pool", None) if _is_single_node(client) else None
        )
        self._keys: dict[tuple[str, int], ShardKeys] = {}
        self.backpressure_waits = 0

    # -- routing -----------------------------------------------------------
    def _call(self, fn: Any) -> Any:
        """``fn()`` retried with backoff while Redis is away."""
        return retry_call(fn, self.outage, give_up_s=self.outage_give_up_s)

    def route(self, table: str) -> TableRoute:
        """The table's route, discovered from the servers' registry on first use.

        Waits up to :attr:`ready_timeout_s` for the table's shard servers: until one has
        registered the table and every shard has published its pull view.
        """
        if table in self.routes:
            return self.routes[table]
        deadline = time.monotonic() + self.ready_timeout_s
        logged = False
        while True:
            raw = self._call(lambda: self.redis.get(registry_key(table)))
            missing: list[int] = []
            if raw is not None:
                info = json.loads(raw)
                route = TableRoute(int(info["dim"]), int(info["shards"]))
                if self.ready_timeout_s > 0:  # and every shard has come up
                    ready = self._call(lambda r=route: self._ready(table, r.shards))
                    missing = [s for s, ok in enumerate(ready) if not ok]
                if not missing:
                    if logged:
                        log.warning("table %r: all %d shard servers are up", table, route.shards)
                    self.routes[table] = route
                    return route
            why = (
                "no shard server has registered it"
                if raw is None
                else f"shards {missing} have not published their pull view"
            )
            if time.monotonic() >= deadline:
                raise ShardsNotReady(
                    f"unknown table {table!r}: {why}"
                    + (f" within {self.ready_timeout_s:g} s" if self.ready_timeout_s else "")
                    + " (is `pipeline ps` running for it?)"
                )
            if not logged:
                log.warning(
                    "table %r: %s; waiting up to %g s for its shard servers",
                    table,
                    why,
                    self.ready_timeout_s,
                )
                logged = True
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def _ready(self, table: str, shards: int) -> list[bool]:
        """Per shard: whether its server has published its pull view (meta ``applied``)."""
        pipe = self.redis.pipeline(transaction=False)
        for shard in range(shards):
            pipe.hexists(self.keys(table, shard).meta, b"applied")
        return [bool(x) for x in pipe.execute()]

    def keys(self, table: str, shard: int) -> ShardKeys:
        key = (table, shard)
        if key not in self._keys:
            self._keys[key] = ShardKeys(table, shard)
        return self._keys[key]

    # -- pull --------------------------------------------------------------
    def pull(self, table: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(weights float32[n, dim], found bool[n]) for ``ids``; misses are zeros."""
        return self._call(lambda: self._pull(table, ids))

    def _pull(self, table: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        route = self.route(table)
        ids = np.asarray(ids, dtype=np.uint64)
        if len(ids) == 0:
            return np.zeros((0, route.dim), np.float32), np.zeros(0, bool)
        while True:
            pulled = self._pull_once(table, route, ids)
            if pulled is not None:
                return pulled
            route = self._await_views(table)

    def _pull_once(
        self, table: str, route: TableRoute, ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """One pull round trip; None when a pulled shard has no pull view (see below).

        With :attr:`ready_timeout_s` set (trainers), each shard's ``applied`` meta field is
        read in the same round trip: a shard without it has lost its pull view (Redis
        restarted empty) and is still rebuilding, and its rows would read as zeros.
        """
        check = self.ready_timeout_s > 0
        if route.shards == 1 and self._raw_pool is not None:
            keys = self.keys(table, 0)
            flags = [("HEXISTS", keys.meta, b"applied")] if check else []
            replies = resp.send(self._raw_pool, [keys.mget_command(ids)], flags)
            if check and not replies[1]:
                return None
            return decode_rows(replies[0], route.dim)
        weights = np.zeros((len(ids), route.dim), dtype=np.float32)
        found = np.zeros(len(ids), dtype=bool)
        parts = [(s, pos) for s, pos in enumerate(split_by_shard(ids, route.shards)) if len(pos)]
        if not parts:
            return weights, found
        if self._raw_pool is not None:
            flags = [("HEXISTS", self.keys(table, s).meta, b"applied") for s, _ in parts]
            replies = resp.send(
                self._raw_pool,
                [self.keys(table, s).mget_command(ids[pos]) for s, pos in parts],
                flags if check else [],
            )
        else:  # Redis Cluster: let redis-py route each MGET to its node
            pipe = self.redis.pipeline(transaction=False)
            for shard, pos in parts:
                # execute_command: cluster pipelines refuse .mget(); one slot per shard here
                pipe.execute_command("MGET", *self.keys(table, shard).pull_keys(ids[pos]))
            if check:
                for shard, _ in parts:
                    pipe.hexists(self.keys(table, shard).meta, b"applied")
            replies = pipe.execute()
        if check and not all(replies[len(parts) :]):
            return None
        for (_, pos), values in zip(parts, replies[: len(parts)], strict=True):
            weights[pos], found[pos] = decode_rows(values, route.dim)
        return weights, found

    def _await_views(self, table: str) -> TableRoute:
        """Wait, as on first use, until the table is registered and every shard has
        published its pull view again (:meth:`route`), rather than train against zeros."""
        self.routes.pop(table, None)
        return self.route(table)

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
            self._inflight.popleft().fields.clear()
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
        self._wait_for_room()
        receipt = PushReceipt(table, seq=self._seq)
        for shard, pos in parts:
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
            receipt.fields[shard] = encode_push(entry)
        lost = self._call(lambda: self._add(receipt, [s for s, _ in parts]))
        self._inflight.append(receipt)
        for shard in lost:
            self._recover(table, shard)
        return receipt

    def _add(self, receipt: PushReceipt, shards: list[int], check: bool = True) -> list[int]:
        """Add ``receipt``'s entries of ``shards`` (idempotent); the shards that lost data."""
        pipe = self.redis.pipeline(transaction=False)
        for shard in shards:
            keys = self.keys(receipt.table, shard)
            prev = self._last.get((receipt.table, shard), (0, b""))[0] if check else 0
            args = [x for kv in receipt.fields[shard].items() for x in kv]
            # execute_command: a Redis Cluster pipeline has no eval(); both keys share
            # the shard's hash tag, so the script runs on the shard's node
            pipe.execute_command(
                "EVAL",
                _PUSH_SCRIPT,
                2,
                keys.stream,
                keys.meta,
                self.trainer_id,
                receipt.seq,
                prev,
                *args,
            )
        lost = []
        for shard, (entry_id, flag) in zip(shards, pipe.execute(), strict=True):
            receipt.entries[shard] = entry_id
            last = self._last.get((receipt.table, shard))
            if last is None or last[0] <= receipt.seq:
                self._last[(receipt.table, shard)] = (receipt.seq, entry_id)
            if flag:
                lost.append(shard)
        return lost

    def _pushed_field(self) -> bytes:
        return f"pushed:{self.trainer_id}".encode()

    def _recover(self, table: str, shard: int) -> None:
        """Redis lost entries of ours on ``table``:``shard``: add again every one in flight
        that the shard server had not applied and the stream no longer holds."""
        with self._recovering:
            self._recover_locked(table, shard)

    def _recover_locked(self, table: str, shard: int) -> None:
        keys = self.keys(table, shard)
        last = self._last.get((table, shard))
        lost_field = f"lost:{self.trainer_id}".encode()
        pushed, lost = self._call(
            lambda: self.redis.hmget(keys.meta, [self._pushed_field(), lost_field])
        )
        if last is None or (
            lost is None and pushed is not None and int(pushed.split(b" ", 1)[0]) == last[0]
        ):
            return  # another thread recovered this shard meanwhile
        inflight = list(self._inflight)  # the comm thread may append meanwhile
        log.warning(
            "%s: Redis lost its data since our last push; checking %d pushes in flight",
            keys.tag,
            len(inflight),
        )
        deadline = time.monotonic() + self.backpressure_timeout_s
        # the server writes "applied" once it has rebuilt the pull view from its table
        while (raw := self._call(lambda: self.redis.hget(keys.meta, b"applied"))) is None:
            if time.monotonic() > deadline:
                raise BackPressureTimeout(
                    f"{keys.tag}: its shard server did not come back within "
                    f"{self.backpressure_timeout_s:g} s after Redis lost its data"
                )
            time.sleep(0.05)
        applied = stream_id_tuple(raw)
        again = 0
        for receipt in inflight:
            entry = receipt.entries.get(shard)
            if receipt.table != table or entry is None or stream_id_tuple(entry) <= applied:
                continue
            if shard not in receipt.fields:
                continue
            if self._call(lambda e=entry: self.redis.xrange(keys.stream, e, e)):
                continue  # still there (Redis kept part of its data)
            self._call(lambda r=receipt: self._add(r, [shard], check=False))
            again += 1
        last = self._last.get((table, shard))

        def settle() -> None:
            pipe = self.redis.pipeline(transaction=False)
            if last is not None:
                pipe.hset(keys.meta, self._pushed_field(), f"{last[0]} ".encode() + last[1])
            pipe.hdel(keys.meta, lost_field)
            pipe.execute()

        self._call(settle)
        self.recovered_entries += again
        log.warning("%s: added %d lost pushes again", keys.tag, again)

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
        return self._applied_many(table, [shard])[0]

    def _applied_many(self, table: str, shards: list[int]) -> list[tuple[int, int]]:
        """The last applied stream id of each of ``shards`` in one round trip.

        Also checks that each meta still records our newest push there; when Redis lost
        it, the lost pushes are added again first (:meth:`_recover`).
        """
        fields = [b"applied", self._pushed_field(), f"lost:{self.trainer_id}".encode()]

        def read() -> list[Any]:
            if len(shards) == 1:
                return [self.redis.hmget(self.keys(table, shards[0]).meta, fields)]
            pipe = self.redis.pipeline(transaction=False)
            for shard in shards:
                pipe.hmget(self.keys(table, shard).meta, fields)
            return list(pipe.execute())

        replies = self._call(read)
        out = []
        for shard, (raw, pushed, lost) in zip(shards, replies, strict=True):
            last = self._last.get((table, shard))
            if last is not None and (
                lost is not None or pushed is None or int(pushed.split(b" ", 1)[0]) != last[0]
            ):
                self._recover(table, shard)
                meta = self.keys(table, shard).meta
                raw = self._call(lambda m=meta: self.redis.hget(m, b"applied"))
            out.append(stream_id_tuple(raw) if raw else (0, 0))
        return out

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
        pending = set(receipt.entries)
        delay = 0.0002
        while pending:
            shards = sorted(pending)
            outages = self.outage.outages
            t = time.monotonic()
            done = self._applied_many(receipt.table, shards)
            if self.outage.outages != outages:  # time spent riding out an outage is not counted
                deadline += time.monotonic() - t
            # entry ids are read after the check: a lost entry added again has a new id
            pending = {
                s
                for s, d in zip(shards, done, strict=True)
                if d < stream_id_tuple(receipt.entries[s])
            }
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
            self._inflight.popleft().fields.clear()

    # -- dense -------------------------------------------------------------
    def pull_dense(self, name: str) -> tuple[int, dict[str, np.ndarray]]:
        """(version, tensors) of a dense table."""
        return self._call(lambda: dense_io.pull_dense(self.redis, name))

    def dense_version(self, name: str) -> int:
        """The dense table's version (0 when it does not exist)."""
        return int(self._call(lambda: dense_io.dense_version(self.redis, name)))

    def push_dense(
        self, name: str, tensors: Mapping[str, np.ndarray], expected_version: int | None = None
    ) -> int:
        """Write a new dense version (optimistic concurrency when ``expected_version`` is given).

        When Redis fails mid-write the table is read back: a write that went through
        (the expected version + 1 holding our bytes) is not written twice.
        """
        while True:
            try:
                version = dense_io.push_dense(self.redis, name, tensors, expected_version)
            except redis_errors() as exc:
                time.sleep(self.outage.failed(exc))
                if expected_version is None:
                    continue
                key = dense_io.dense_key(name)
                try:
                    current, blob = self.redis.hmget(key, [b"v", b"blob"])
                except redis_errors():
                    continue
                self.outage.ok()
                if (
                    current is not None
                    and int(current) == expected_version + 1
                    and blob == dense_io.pack_tensors(tensors)
                ):
                    return expected_version + 1
                continue
            self.outage.ok()
            return version
