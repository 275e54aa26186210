"""The snapshot coordinator: one active instance takes consistent cuts every interval.

A snapshot is taken in five steps: (1) write the request (the temp directory
``DIR/<id>.tmp``) to Redis; (2) place a ``snap:<id>`` barrier in every shard
stream of every table; (3) wait until every shard has saved what it applied
before its barrier and acknowledged; (4) save the dense tables and write
``manifest.json`` (checksums, stream ids, offsets) last; (5) rename the temp
directory to ``DIR/<id>`` and apply retention. A timeout or a failed shard
aborts the cut: the request is deleted (late shards then save nothing) and the
temp directory removed, so there is never a half snapshot under a final name.

Shard servers write their parts straight into the directory, so ``DIR`` must be
a filesystem every shard server and the coordinator see at the same path.

Single instance: a Redis lock (``SET NX PX`` with a token) is held while
snapshotting and checked again before the rename.

With ``job`` set and trainers of that job live (heartbeats of
:class:`~pipeline.snapshot.participant.SnapshotParticipant`), step (2) is the
trainers': the request lists them, each flushes and places its own barriers with
its committed offsets, registers, and holds its pushes until the request closes;
shards save at the barrier that completes the list. The manifest's offsets are
then the union of the trainers' committed positions (exact), and each trainer's
dense and optimizer state is saved under ``trainers/<id>.bin``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.periodic import run_every
from pipeline.ps.client import PSClient, ShardsNotReady
from pipeline.ps.dense import pack_tensors, pull_dense
from pipeline.redislock import RedisLock
from pipeline.retry import Outage, redis_errors, redis_where
from pipeline.snapshot.layout import (
    FORMAT,
    MANIFEST,
    TMP_SUFFIX,
    VERSION,
    SnapshotError,
    list_snapshots,
    retained,
    sha256_file,
    shard_dir,
)
from pipeline.snapshot.protocol import (
    REQUEST_TTL_MS,
    PartAck,
    TrainerRegistration,
    acks_key,
    barrier_name,
    live_key,
    lock_key,
    open_key,
    request_key,
    seq_key,
    trainer_state_key,
    trainers_key,
)

__all__ = ["SnapshotCoordinator", "TakenSnapshot"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TakenSnapshot:
    """What :meth:`SnapshotCoordinator.take` wrote."""

    id: str
    path: Path
    rows: dict[str, int]
    seconds: float
    deleted: list[str]


class SnapshotCoordinator:
    """Takes snapshots of ``tables`` (sparse, via their shard servers) and ``dense`` tables."""

    def __init__(
        self,
        client: Any,
        directory: str | Path,
        tables: Sequence[str],
        dense: Sequence[str] = (),
        *,
        keep: int = 5,
        keep_daily: int = 7,
        name: str = "default",
        job: str | None = None,
        ack_timeout_s: float = 300.0,
        lock_ttl_ms: int = 600_000,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        if not tables:
            raise ValueError("a snapshot needs at least one sparse table")
        if keep < 1 or keep_daily < 0:
            raise ValueError(f"keep must be >= 1 and keep_daily >= 0, got {keep}, {keep_daily}")
        self.redis = client
        self.directory = Path(directory).resolve()
        self.tables = list(tables)
        self.dense_tables = list(dense)
        self.keep, self.keep_daily = keep, keep_daily
        self.name = name
        self.job = job
        self.ack_timeout_s = ack_timeout_s
        self.clock_ms = clock_ms
        self.lock = RedisLock(client, lock_key(name), lock_ttl_ms)
        self.ps = PSClient(client, trainer_id=f"snapshot-{name}")

    # -- the lock ------------------------------------------------------------
    def acquire(self) -> bool:
        """Take the series' lock (or refresh it if already ours)."""
        return self.lock.acquire()

    def release(self) -> None:
        self.lock.release()

    def _hold(self) -> None:
        if not self.acquire():
            raise SnapshotError(
                f"another snapshot coordinator holds the lock of {self.name!r} "
                f"({lock_key(self.name).decode()})"
            )

    # -- one snapshot --------------------------------------------------------
    def take(self) -> TakenSnapshot:
        """Take one snapshot; raises SnapshotError (leaving nothing behind) if it cannot."""
        t0 = time.perf_counter()
        self._hold()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sweep_unfinished()
        created = self.clock_ms()
        seq = self._next_seq()
        stamp = dt.datetime.fromtimestamp(created / 1000, dt.timezone.utc).strftime(
            "%Y%m%dT%H%M%SZ"
        )
        snapshot_id = f"{stamp}-{seq:06d}"
        tmp = self.directory / (snapshot_id + TMP_SUFFIX)
        final = self.directory / snapshot_id
        tmp.mkdir()
        trainers = self.live_trainers()
        request: dict[bytes, bytes] = {b"dir": str(tmp).encode()}
        if trainers:
            request[b"trainers"] = json.dumps(trainers).encode()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(request_key(snapshot_id), mapping=request)
        pipe.pexpire(request_key(snapshot_id), REQUEST_TTL_MS)
        if trainers:
            assert self.job is not None
            pipe.set(open_key(self.job), snapshot_id.encode(), px=REQUEST_TTL_MS)
        pipe.execute()
        try:
            registrations = self._wait_trainers(snapshot_id, trainers) if trainers else {}
            acks = self._collect(snapshot_id, place_barriers=not trainers)
            manifest = self._manifest(snapshot_id, created, tmp, acks, registrations)
            self._hold()  # a coordinator that lost its lock never completes a snapshot
            _write_json(tmp / MANIFEST, manifest)
            os.rename(tmp, final)
            _fsync_dir(self.directory)
        except BaseException:
            self.redis.delete(request_key(snapshot_id))
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            keys = [request_key(snapshot_id), acks_key(snapshot_id), trainers_key(snapshot_id)]
            keys += [trainer_state_key(snapshot_id, t) for t in trainers]
            if trainers:
                assert self.job is not None
                self._close_open(snapshot_id)
            # deleting the request also releases the trainers holding their pushes
            self.redis.delete(*keys)
        deleted = self._retain()
        rows = {
            t: sum(p["rows"] for p in i["parts"].values()) for t, i in manifest["tables"].items()
        }
        seconds = time.perf_counter() - t0
        log.info("snapshot %s: %s rows in %.2f s -> %s", snapshot_id, rows, seconds, final)
        return TakenSnapshot(snapshot_id, final, rows, seconds, deleted)

    def _next_seq(self) -> int:
        """The series' next number; after Redis lost the counter it continues after the
        newest snapshot on disk (ids stay unique and increasing)."""
        key = seq_key(self.name)
        if not self.redis.exists(key):
            last = 0
            for snap in list_snapshots(self.directory):
                tail = snap.id.rsplit("-", 1)[-1]
                last = max(last, int(tail) if tail.isdigit() else 0)
            if self.redis.set(key, last, nx=True) and last:
                log.warning(
                    "snapshot counter of %s is not in Redis: continuing after %d", self.name, last
                )
        return int(self.redis.incr(key))

    def live_trainers(self) -> list[str]:
        """Ids of the job's trainers whose heartbeat has not expired (none without ``job``)."""
        if self.job is None:
            return []
        key = live_key(self.job)
        now = self.clock_ms()
        self.redis.zremrangebyscore(key, "-inf", now)
        return sorted(m.decode() for m in self.redis.zrangebyscore(key, now, "+inf"))

    def _close_open(self, snapshot_id: str) -> None:
        assert self.job is not None
        key = open_key(self.job)
        if self.redis.get(key) == snapshot_id.encode():
            self.redis.delete(key)

    def _wait_trainers(
        self, snapshot_id: str, trainers: list[str]
    ) -> dict[str, TrainerRegistration]:
        """Wait until every listed trainer has flushed, placed its barriers and registered."""
        deadline = time.monotonic() + self.ack_timeout_s
        delay = 0.002
        while True:
            raw = self.redis.hgetall(trainers_key(snapshot_id))
            regs = {k.decode(): TrainerRegistration.from_json(v) for k, v in raw.items()}
            if set(trainers) <= set(regs):
                self._close_open(snapshot_id)
                return {t: regs[t] for t in trainers}
            if time.monotonic() > deadline:
                missing = sorted(set(trainers) - set(regs))
                raise SnapshotError(
                    f"snapshot {snapshot_id}: trainers {missing} did not join within "
                    f"{self.ack_timeout_s:g} s (stopped, or stuck on a message?); aborted"
                )
            self._hold()
            time.sleep(delay)
            delay = min(2 * delay, 0.05)

    def _collect(self, snapshot_id: str, place_barriers: bool = True) -> dict[str, PartAck]:
        """Place the barriers (unless trainers did); wait for every shard's ack (all ok)."""
        expected: set[str] = set()
        for table in self.tables:
            try:
                shards = self.ps.route(table).shards
            except ShardsNotReady as exc:  # e.g. Redis lost the registry: servers re-register
                raise SnapshotError(f"snapshot {snapshot_id}: {exc}") from None
            expected |= {f"{table}:{s}" for s in range(shards)}
            if place_barriers:
                self.ps.barrier(table, barrier_name(snapshot_id))
        deadline = time.monotonic() + self.ack_timeout_s
        delay = 0.002
        while True:
            raw = self.redis.hgetall(acks_key(snapshot_id))
            acks = {k.decode(): PartAck.from_json(v) for k, v in raw.items()}
            bad = {k: a for k, a in acks.items() if a.status != "ok"}
            if bad:
                raise SnapshotError(
                    f"snapshot {snapshot_id}: shards failed to save: "
                    + "; ".join(f"{k}: {a.message}" for k, a in sorted(bad.items()))
                )
            if expected <= set(acks):
                return {k: acks[k] for k in sorted(expected)}
            if time.monotonic() > deadline:
                missing = sorted(expected - set(acks))
                raise SnapshotError(
                    f"snapshot {snapshot_id}: shards {missing} did not save within "
                    f"{self.ack_timeout_s:g} s (are their shard servers running?); aborted"
                )
            self._hold()
            time.sleep(delay)
            delay = min(2 * delay, 0.05)

    def _manifest(
        self,
        snapshot_id: str,
        created: int,
        tmp: Path,
        acks: dict[str, PartAck],
        registrations: dict[str, TrainerRegistration],
    ) -> dict[str, Any]:
        tables: dict[str, Any] = {}
        for table in self.tables:
            shards = self.ps.route(table).shards
            parts = {}
            for shard in range(shards):
                ack = acks[f"{table}:{shard}"]
                path = shard_dir(table, shard, shards)
                if sha256_file(tmp / path / "meta.json") != ack.meta_sha256:
                    raise SnapshotError(f"snapshot {snapshot_id}: {path} changed after its ack")
                parts[str(shard)] = {
                    "path": path,
                    "rows": ack.rows,
                    "stream_id": ack.stream_id,
                    "meta_sha256": ack.meta_sha256,
                    "max_event_time": ack.max_event_time,
                    "offsets": ack.offsets,
                }
            tables[table] = {"shards": shards, "parts": parts}
        dense: dict[str, Any] = {}
        if self.dense_tables:
            (tmp / "dense").mkdir()
        for name in self.dense_tables:
            version, tensors = pull_dense(self.redis, name)
            if not tensors:
                raise SnapshotError(f"snapshot {snapshot_id}: dense table {name!r} is empty")
            file = tmp / "dense" / f"{name}.bin"
            _write_bytes(file, pack_tensors(tensors))
            dense[name] = {
                "path": f"dense/{name}.bin",
                "version": version,
                "sha256": sha256_file(file),
            }
        trainers: dict[str, Any] = {}
        if registrations:
            (tmp / "trainers").mkdir()
        for tid, reg in registrations.items():
            blob = self.redis.get(trainer_state_key(snapshot_id, tid))
            if blob is None:
                raise SnapshotError(f"snapshot {snapshot_id}: trainer {tid!r} left no state")
            file = tmp / "trainers" / f"{_safe(tid)}.bin"
            _write_bytes(file, blob)
            trainers[tid] = {
                "path": f"trainers/{file.name}",
                "sha256": sha256_file(file),
                "offsets": reg.offsets,
                "dense_table": reg.dense_table,
                "dense_version": reg.dense_version,
                "rows": reg.rows,
            }
        offsets = (
            trainer_offsets(registrations.values())
            if registrations
            else resume_offsets(acks.values())
        )
        return {
            "format": FORMAT,
            "version": VERSION,
            "id": snapshot_id,
            "created_ms": created,
            "tables": tables,
            "dense": dense,
            "trainers": trainers,
            "offsets": offsets,
        }

    # -- housekeeping --------------------------------------------------------
    def _sweep_unfinished(self) -> None:
        """Remove temp directories of aborted or crashed snapshots (we hold the lock)."""
        for child in self.directory.glob("*" + TMP_SUFFIX):
            log.warning("removing unfinished snapshot %s", child)
            shutil.rmtree(child, ignore_errors=True)

    def _retain(self) -> list[str]:
        snaps = list_snapshots(self.directory)
        keep = retained([(s.id, s.created_ms) for s in snaps], self.keep, self.keep_daily)
        deleted = []
        for snap in snaps:
            if snap.id not in keep:
                # rename first: a reader never sees a half-deleted snapshot as complete
                doomed = snap.path.with_name(snap.path.name + ".del" + TMP_SUFFIX)
                os.rename(snap.path, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
                deleted.append(snap.id)
        return deleted

    # -- the loop ------------------------------------------------------------
    def run(
        self,
        stop: threading.Event,
        interval_s: float,
        on_snapshot: Callable[[TakenSnapshot], None] | None = None,
    ) -> None:
        """Snapshot every ``interval_s`` until ``stop``; a failed cut is logged and retried."""
        outage = Outage(f"redis at {redis_where(self.redis)}", log)
        try:
            run_every(stop, interval_s, self.take, on_snapshot, SnapshotError, log, outage=outage)
        finally:
            try:
                self.release()
            except redis_errors() as exc:
                log.warning("could not release the snapshot lock (it expires): %s", exc)


def resume_offsets(acks: Any) -> list[dict[str, Any]]:
    """Per topic-partition, the lowest next offset over the shards that saw it.

    Each shard knows the offsets carried by the pushes it applied before its
    barrier. Shards may differ by a push in flight when the barriers went in, so
    resuming from the lowest is at-least-once: nothing before the cut is skipped;
    a push some shards already hold may be applied twice on those shards.
    """
    merged: dict[tuple[str, int], int] = {}
    for ack in acks:
        for topic, parts in ack.offsets.items():
            for partition, offset in parts.items():
                key = (topic, int(partition))
                merged[key] = min(merged.get(key, int(offset)), int(offset))
    return [{"topic": t, "partition": p, "offset": o} for (t, p), o in sorted(merged.items())]


def trainer_offsets(registrations: Any) -> list[dict[str, Any]]:
    """Per topic-partition, the trainers' committed next offset (the union; exact).

    Each partition has one owner at a time; should two trainers report one (a
    rebalance between their commits), the higher position is the later owner's.
    """
    merged: dict[tuple[str, int], int] = {}
    for reg in registrations:
        for topic, parts in reg.offsets.items():
            for partition, offset in parts.items():
                key = (topic, int(partition))
                merged[key] = max(merged.get(key, int(offset)), int(offset))
    return [{"topic": t, "partition": p, "offset": o} for (t, p), o in sorted(merged.items())]


def _safe(trainer_id: str) -> str:
    """A trainer id as a file name (anything but [A-Za-z0-9._-] becomes '_')."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in trainer_id)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    _write_bytes(path, json.dumps(doc, indent=2, sort_keys=True).encode())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
