"""The shard server: single writer of one shard of every table.

Loop: read the shard's grad streams (consumer group ``ps``), decode and apply
each entry to the :class:`~pipeline.ps.table.ShardTable`, write the changed
weights to the pull view, record the applied stream id, ack. Bad entries are
counted by reason and acked, never applied partially, never fatal. While Redis is
away the server retries with backoff (:mod:`pipeline.retry`); once it is back it
re-registers, repositions its consumer groups after what its table holds and
rebuilds its pull view, whether Redis kept its data or not.

Durability (the guarantee): with a ``data_dir``, the server checkpoints each
table (both tiers) incrementally (:mod:`pipeline.ps.checkpoint`: deltas of the
changed rows at least every ``checkpoint_interval_s``, bases written in slices
between rounds), each checkpoint with the last applied stream id it covers, and
trims a stream only up to its last durable checkpoint. A server killed at any
point restarts from that checkpoint (base + deltas: the exact table) and re-reads
every entry after it, so no acknowledged push (an XADD that returned) is lost
while Redis keeps its data; each is applied exactly once to the restored state. Without a
``data_dir`` the table lives in memory only and streams are trimmed as soon as
entries are applied: a crash loses the table (Redis still serves the last
weights). If Redis itself is flushed, the server rebuilds the pull view and
its consumer groups from its table; pushes still in the lost streams are gone.

Snapshots (pipeline.snapshot): a ``snap:<id>`` barrier makes the server save
every table as of that point in its stream. With ``restore`` the server starts
from a snapshot instead (verified; its own checkpoints are ignored), replaces
its pull view with the snapshot's rows and skips every entry already in its
streams: trainers replay from the snapshot's offsets.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.ps import pullview, resp
from pipeline.ps.accessor import Clock, system_clock
from pipeline.ps.checkpoint import CheckpointOptions, Checkpoints
from pipeline.ps.client import registry_key
from pipeline.ps.export import ExportError, import_table
from pipeline.ps.gradstream import StreamEntryError, decode_push
from pipeline.ps.keys import ShardKeys
from pipeline.ps.spec import TableSpec
from pipeline.ps.staging.tracker import PublishTracker
from pipeline.ps.table import PushRejected, ShardTable, cold_width
from pipeline.retry import Outage, redis_errors, redis_where, retry_call
from pipeline.snapshot.layout import SnapshotError, load_snapshot
from pipeline.snapshot.shard import on_barrier as snapshot_barrier

__all__ = ["GROUP", "ServerOptions", "ShardServer"]

log = logging.getLogger(__name__)

GROUP = b"ps"


@dataclass(frozen=True)
class ServerOptions:
    """Tunables of a shard server (set from PSSettings by the CLI)."""

    data_dir: Path | None = None
    hot_budget_rows: int | None = None
    checkpoint_interval_s: float = 30.0
    shrink_interval_s: float = 3600.0
    read_count: int = 64
    block_ms: int = 100
    cold_block_cache_bytes: int = 512 << 20
    restore: Path | None = None
    # A delta as soon as this many rows changed (bounds the apply stall of a checkpoint).
    max_delta_rows: int = 65_536
    # A new checkpoint base once the deltas since the last one hold this fraction of the table.
    compact_fraction: float = 0.5

    def checkpoint_options(self) -> CheckpointOptions:
        return CheckpointOptions(
            interval_s=self.checkpoint_interval_s,
            max_delta_rows=self.max_delta_rows,
            compact_fraction=self.compact_fraction,
        )


@dataclass
class _Shard:
    """One table's state inside the server."""

    spec: TableSpec
    keys: ShardKeys
    table: ShardTable
    checkpoints: Checkpoints | None = None  # with a data_dir
    applied: bytes = b"0-0"
    trimmed: str = "0-0"  # the stream is trimmed up to here (the last durable checkpoint)
    restored: bool = False
    publish: PublishTracker = field(default_factory=PublishTracker)


@dataclass
class ServerStats:
    """Counters a server exposes (also mirrored into the meta hash in Redis)."""

    entries: int = 0
    rows: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    checkpoints: int = 0
    rebuilds: int = 0


def _glob_escape(raw: bytes) -> bytes:
    """``raw`` with Redis glob metacharacters escaped (for SCAN MATCH)."""
    out = bytearray()
    for byte in raw:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)


def _single_node_type() -> type:
    import redis

    return redis.Redis


class ShardServer:
    """Owns shard ``shard`` of ``shards`` for every table in ``specs``."""

    def __init__(
        self,
        client: Any,
        specs: Sequence[TableSpec],
        shard: int,
        shards: int,
        options: ServerOptions | None = None,
        clock: Clock = system_clock,
    ) -> None:
        if not 0 <= shard < shards:
            raise ValueError(f"shard must be in [0, {shards}), got {shard}")
        self.redis = client
        self.shard, self.shards = shard, shards
        self.options = options or ServerOptions()
        self.clock = clock
        self.consumer = f"shard-{shard}".encode()
        self.stats = ServerStats()
        self._cluster = not isinstance(client, _single_node_type())
        # a plain single-node client: apply rounds send pre-encoded commands on its pool
        self._raw_pool = None if self._cluster else getattr(client, "connection_pool", None)
        self._snapshot = (
            load_snapshot(self.options.restore) if self.options.restore is not None else None
        )
        self._tables = {spec.name: self._open(spec) for spec in specs}
        self._last_shrink = time.monotonic()
        self.ready = threading.Event()  # set by run() once the pull view is published
        self.outage = Outage(f"redis at {redis_where(client)}", log)

    # -- setup ---------------------------------------------------------------
    def _dir(self, spec: TableSpec) -> Path | None:
        if self.options.data_dir is None:
            return None
        return Path(self.options.data_dir) / spec.name / f"shard-{self.shard}-of-{self.shards}"

    def _open(self, spec: TableSpec) -> _Shard:
        directory = self._dir(spec)
        cold = None
        if directory is not None and self.options.hot_budget_rows is not None:
            from pipeline.ps.tiers.ssd import SsdTier

            cold_dir = directory / "cold"
            shutil.rmtree(cold_dir, ignore_errors=True)  # the checkpoint is the truth
            width = cold_width(spec)
            cold = SsdTier(cold_dir, width, block_cache_bytes=self.options.cold_block_cache_bytes)
        table = ShardTable(spec, cold, self.options.hot_budget_rows, self.clock)
        state = _Shard(spec, ShardKeys(spec.name, self.shard), table)
        if directory is not None:
            state.checkpoints = Checkpoints(directory, table, self.options.checkpoint_options())
        if self._snapshot is not None:
            part = self._snapshot.part(spec.name, self.shard, self.shards)
            try:
                rows = import_table(table, part)
            except (ExportError, OSError) as exc:
                raise SnapshotError(f"cannot restore {state.keys.tag} from {part}: {exc}") from None
            if state.checkpoints is not None:
                state.checkpoints.replace()  # start() checkpoints the restored table
            state.restored = True
            log.info("%s: restored %d rows from snapshot %s", state.keys.tag, rows, part)
        elif state.checkpoints is not None:
            stream_id = state.checkpoints.restore()
            if stream_id is not None:
                state.applied, state.trimmed = stream_id.encode(), stream_id
                log.info("%s: restored %d rows from %s", state.keys.tag, len(table), directory)
        return state

    def start(self) -> None:
        """Register tables, position consumer groups, publish the pull view."""
        for state in self._tables.values():
            self._register(state)
            if state.restored:
                self._forget_stream_and_view(state)
            self._position_group(state)
            self._rebuild_pull_view(state)
        if any(s.restored for s in self._tables.values()):
            for state in self._tables.values():
                state.restored = False
            if self.options.data_dir is not None:
                self.checkpoint()  # a restart resumes from the snapshot, not older checkpoints

    def _forget_stream_and_view(self, state: _Shard) -> None:
        """After a restore: skip what the stream holds, drop pull-view rows of the old state."""
        last = self.redis.xrevrange(state.keys.stream, count=1)
        state.applied = last[0][0] if last else b"0-0"
        pattern = _glob_escape(state.keys.pull_prefix) + b"*"
        stale: list[bytes] = []
        for key in self.redis.scan_iter(match=pattern, count=10_000):
            stale.append(key)
            if len(stale) >= pullview.WRITE_CHUNK:
                self.redis.delete(*stale)
                stale = []
        if stale:
            self.redis.delete(*stale)

    def _register(self, state: _Shard) -> None:
        info = {"dim": state.spec.dim, "shards": self.shards}
        key = registry_key(state.spec.name)
        current = self.redis.get(key)
        if current is not None and json.loads(current) != info:
            raise RuntimeError(
                f"table {state.spec.name} is registered as {json.loads(current)}, "
                f"this server has {info}: mismatched --shards or table spec"
            )
        self.redis.set(key, json.dumps(info))

    def _position_group(self, state: _Shard) -> None:
        """Deliver every entry after what the table already holds (replay after restart)."""
        import redis

        try:
            self.redis.xgroup_create(state.keys.stream, GROUP, id=state.applied, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            self.redis.xgroup_setid(state.keys.stream, GROUP, id=state.applied)

    def _rebuild_pull_view(self, state: _Shard) -> None:
        pipe = self.redis.pipeline(transaction=False)
        written = 0
        for batch in state.table.export_rows():
            ids, weights = batch.ids[batch.admitted], batch.weights[batch.admitted]
            pullview.write_rows(pipe, state.keys, ids, weights)
            written += len(ids)
            if len(pipe) > 64:
                pipe.execute()
        pipe.hset(state.keys.meta, mapping={b"applied": state.applied, b"rows": len(state.table)})
        pipe.execute()
        log.info("%s: pull view holds %d admitted rows", state.keys.tag, written)

    # -- the loop ------------------------------------------------------------
    def step(self) -> int:
        """Read and apply one round of entries from every table's stream; returns entries read."""
        import redis

        try:
            reply = self._read()
        except redis_errors() as exc:
            time.sleep(self.outage.failed(exc))
            return 0
        except redis.ResponseError as exc:
            # NOGROUP: the group is gone; UNBLOCKED: the stream vanished while we waited.
            if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                raise
            self.outage.ok()
            log.warning("consumer groups are gone (Redis flushed or restarted): rebuilding")
            self.stats.rebuilds += 1
            self.start()
            return 0
        if self.outage.ok():
            # a round may have failed half-written: rebuild from the table, and deliver
            # again every entry after what it holds (this read's included)
            log.warning("rebuilding the pull view and consumer groups after the outage")
            self.stats.rebuilds += 1
            self.start()
            return 0
        by_stream = {s.keys.stream: s for s in self._tables.values()}
        total = 0
        for stream, entries in reply or []:
            state = by_stream[stream if isinstance(stream, bytes) else stream.encode()]
            total += self._apply_entries(state, entries)
        self._maintain()
        return total

    def _read(self) -> list[Any]:
        """One XREADGROUP over all streams; on Redis Cluster one per stream (their
        hash tags differ, so a multi-stream read would cross slots)."""
        streams = [s.keys.stream for s in self._tables.values()]
        if not self._cluster:
            reply = self.redis.xreadgroup(
                GROUP,
                self.consumer,
                dict.fromkeys(streams, b">"),
                count=self.options.read_count,
                block=self.options.block_ms,
            )
            return list(reply or [])
        out: list[Any] = []
        block = max(1, self.options.block_ms // len(streams))
        for stream in streams:
            reply = self.redis.xreadgroup(
                GROUP, self.consumer, {stream: b">"}, count=self.options.read_count, block=block
            )
            out.extend(reply or [])
        return out

    def _apply_entries(self, state: _Shard, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> int:
        changed_ids: list[np.ndarray] = []
        changed_w: list[np.ndarray] = []
        barriers: dict[bytes, bytes] = {}
        for entry_id, fields in entries:
            try:
                push = decode_push(fields, state.spec.dim)
                if push.kind == "barrier":
                    # A publish request is staged, not kept in meta (one per version).
                    staged = state.publish.on_barrier(
                        self.redis, state.keys, state.table, push.barrier
                    )
                    if staged is not None:
                        continue
                    if snapshot_barrier(
                        self.redis,
                        state.keys,
                        state.table,
                        self.shards,
                        push.barrier,
                        entry_id,
                        state.publish,
                        push.trainer,
                    ):
                        continue
                    barriers[f"barrier:{push.barrier}".encode()] = entry_id
                    continue
                apply = state.table.apply_delta if push.kind == "delta" else state.table.apply_push
                result = apply(push.ids, push.values, push.shows, push.clicks)
            except (StreamEntryError, PushRejected) as exc:
                reason = exc.reason if isinstance(exc, StreamEntryError) else str(exc.reason.value)
                self.stats.rejected[reason] += 1
                log.warning("%s: rejected entry %r: %s", state.keys.tag, entry_id, exc)
                continue
            state.publish.record(result.changed_ids, push.max_event_time, push.offsets)
            changed_ids.append(result.changed_ids)
            changed_w.append(result.changed_weights)
            self.stats.rows += len(push.ids)
            cp = state.checkpoints
            if cp is not None and state.table.changed_rows >= cp.options.max_delta_rows:
                cp.cut(entry_id.decode())  # mid-round: keeps every delta (and its copy) small
        self.stats.entries += len(entries)
        state.applied = entries[-1][0]
        rows: tuple[np.ndarray, np.ndarray] | None = None
        if changed_ids:
            ids = np.concatenate(changed_ids)
            weights = np.concatenate(changed_w)
            # The same id may change in several entries: keep its last weights.
            _, last_rev = np.unique(ids[::-1], return_index=True)
            keep = len(ids) - 1 - last_rev
            rows = ids[keep], weights[keep]
        meta: dict[bytes, Any] = {b"applied": state.applied, b"rows": len(state.table), **barriers}
        for reason, count in self.stats.rejected.items():
            meta[f"rejected:{reason}".encode()] = count
        # the pull view first, then "applied": a trainer that sees it reads the new rows
        commands: list[tuple[Any, ...]] = [
            ("HSET", state.keys.meta, *[x for kv in meta.items() for x in kv]),
            ("XACK", state.keys.stream, GROUP, *[entry_id for entry_id, _ in entries]),
        ]
        if self.options.data_dir is None:  # nothing to replay from: trim what is applied
            commands.append(("XTRIM", state.keys.stream, "MINID", state.applied))
        if self._raw_pool is not None:
            raw = [] if rows is None else pullview.write_commands(state.keys, *rows)
            resp.send(self._raw_pool, raw, commands)
            return len(entries)
        pipe = self.redis.pipeline(transaction=False)
        if rows is not None:
            pullview.write_rows(pipe, state.keys, *rows)
        for command in commands:
            pipe.execute_command(*command)
        pipe.execute()
        return len(entries)

    def _maintain(self) -> None:
        now = time.monotonic()
        if now - self._last_shrink >= self.options.shrink_interval_s:
            self._last_shrink = now
            self.shrink()
        for state in self._tables.values():
            if state.checkpoints is not None:
                # Cuts a delta when due, reads a slice of a base, notices finished writes.
                state.checkpoints.step(state.applied.decode())
                self._trim(state)

    def _trim(self, state: _Shard) -> None:
        """Trim the stream up to the last durable checkpoint (entries after it are kept
        for the replay after a crash)."""
        cp = state.checkpoints
        durable = cp.durable_stream_id if cp is not None else None
        if durable is not None and durable != state.trimmed:
            self.redis.xtrim(state.keys.stream, minid=durable)
            state.trimmed = durable
            self.stats.checkpoints += 1

    def shrink(self) -> int:
        """Decay statistics, delete expired rows from both tiers and the pull view."""
        deleted = 0
        for state in self._tables.values():
            ids = state.table.shrink(self.clock())
            state.publish.record_deleted(ids)
            if len(ids):
                pipe = self.redis.pipeline(transaction=False)
                pullview.delete_rows(pipe, state.keys, ids)
                pipe.execute()
            deleted += len(ids)
        return deleted

    def checkpoint(self) -> None:
        """Checkpoint every table now and wait until it is durable, then trim its stream
        (shutdown; after a restore). A delta when the chain on disk can be extended,
        else a whole base (after a snapshot restore)."""
        for state in self._tables.values():
            if state.checkpoints is not None:
                state.checkpoints.sync(state.applied.decode())
                self._trim(state)

    def run(self, stop: threading.Event, on_step: Callable[[int], None] | None = None) -> None:
        """Serve until ``stop`` is set, riding out Redis outages; checkpoints once more on
        the way out."""
        retry_call(self.start, self.outage, stop=stop)
        self.ready.set()
        while not stop.is_set():
            try:
                applied = self.step()
            except redis_errors() as exc:  # mid-round: the next good read rebuilds
                stop.wait(self.outage.failed(exc))
                continue
            if on_step is not None:
                on_step(applied)
        if self.options.data_dir is not None:
            self.checkpoint()

    def table(self, name: str) -> ShardTable:
        """The shard table of ``name`` (tests and tools)."""
        return self._tables[name].table

    def close(self) -> None:
        for state in self._tables.values():
            if state.checkpoints is not None:
                state.checkpoints.close()
            cold = state.table.cold_tier
            if cold is not None:
                cold.close()
