"""The publisher: one active instance per model writes versions to ``model.updates``.

A version is made in four steps: (1) place a publish request (a barrier) in every
shard stream of every table of the model; (2) wait until every shard has staged
its rows (a base: all serving rows; a delta: rows changed since the parent, and
tombstones) in Redis and acknowledged; (3) produce those payloads as chunks, then
the dense parameters from the PS dense table; (4) produce the manifest last and
record the version as complete. Readers count a version only once its manifest
arrives, so a publisher dying anywhere leaves no half model, only orphan chunks.

Single instance: a Redis lock (``SET NX PX`` with a token) is held while
publishing and checked again before the manifest goes out.

Redis is not where versions are numbered from: when the publisher's state there is
gone (Redis restarted without persistence, or flushed), it continues after the
newest manifest on ``model.updates`` (``last_manifest``), with a base, so version
numbers keep increasing for every subscriber. While Redis is away, :meth:`run`
retries with backoff and resumes by itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import PipelineError
from pipeline.model.spec import ModelSpec
from pipeline.periodic import run_every
from pipeline.ps.client import PSClient, ShardsNotReady
from pipeline.ps.dense import pack_tensors, pull_dense
from pipeline.ps.staging.chunks import checksum, split_bytes
from pipeline.ps.staging.requests import PublishRequest, ShardAck, acks_key, piece_key
from pipeline.publish.messages import CHUNK, MANIFEST, message
from pipeline.redislock import RedisLock
from pipeline.retry import Outage, redis_errors, redis_where

__all__ = ["DEFAULT_MAX_CHUNK_BYTES", "PublishError", "PublishedVersion", "Publisher"]

log = logging.getLogger(__name__)

DEFAULT_MAX_CHUNK_BYTES = 8 << 20  # well under model.updates' max.message.bytes (16 MiB)
MAX_CHUNK_BYTES_LIMIT = 15 << 20  # leaves room for the Avro record and headers


class PublishError(PipelineError):
    """A version could not be published; nothing of it counts (no manifest went out)."""


@dataclass(frozen=True)
class PublishedVersion:
    """What :meth:`Publisher.publish` wrote."""

    version: int
    parent: int | None
    kind: str  # "base" or "delta"
    chunk_counts: dict[str, int]
    rows: dict[str, int]
    tombstones: dict[str, int]
    max_event_time: int
    payload_bytes: int
    seconds: float
    checksums: dict[str, list[str]] = field(default_factory=dict)
    base_offset: int | None = None  # where the base this version builds on starts


def state_key(model: str) -> bytes:
    """Hash of the publisher's progress: next, complete, since_base, base_offset."""
    return f"pub:{{{model}}}:state".encode()


def lock_key(model: str) -> bytes:
    return f"pub:{{{model}}}:lock".encode()


class Publisher:
    """Publishes versions of ``model`` (its sparse tables + dense table) to ``topic``."""

    def __init__(
        self,
        client: Any,
        producer: Any,
        topic: str,
        model: ModelSpec,
        *,
        base_every: int = 10,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        ack_timeout_s: float = 60.0,
        lock_ttl_ms: int = 120_000,
        holder: str | None = None,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        last_manifest: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        if base_every < 1:
            raise ValueError(f"base_every must be >= 1, got {base_every}")
        if not 64 <= max_chunk_bytes <= MAX_CHUNK_BYTES_LIMIT:
            raise ValueError(
                f"max_chunk_bytes must be in [64, {MAX_CHUNK_BYTES_LIMIT}], got {max_chunk_bytes}"
            )
        self.redis = client
        self.producer = producer
        self.topic = topic
        self.model = model
        self.base_every = base_every
        self.max_chunk_bytes = max_chunk_bytes
        self.ack_timeout_s = ack_timeout_s
        self.clock_ms = clock_ms
        # a restarted publisher with the same ``holder`` id takes its lock back at once
        self.lock = RedisLock(client, lock_key(model.name), lock_ttl_ms, holder)
        self.ps = PSClient(client, trainer_id=f"publisher-{model.name}")
        self._delivery_errors: list[str] = []
        self._delivered_offsets: list[int] = []
        #: reads the newest manifest of the model on the topic (the durable version count)
        self.last_manifest = last_manifest
        self.outage = Outage(f"redis at {redis_where(client)}", log)

    # -- the lock ------------------------------------------------------------
    def acquire(self) -> bool:
        """Take the model's publisher lock (or refresh it if already ours)."""
        return self.lock.acquire()

    def release(self) -> None:
        self.lock.release()

    def _hold(self) -> None:
        if not self.acquire():
            raise PublishError(
                f"another publisher holds the lock of model {self.model.name!r} "
                f"({lock_key(self.model.name).decode()})"
            )

    # -- one version ---------------------------------------------------------
    def publish(self, *, force_base: bool = False) -> PublishedVersion:
        """Publish the next version; a base when due, forced, or a shard cannot build a delta."""
        try:
            return self._publish(force_base)
        except _NeedBase as exc:
            log.info("version %d: %s; publishing a base instead", exc.version, exc)
            return self._publish(True)

    def _publish(self, force_base: bool) -> PublishedVersion:
        t0 = time.perf_counter()
        self._hold()
        name = self.model.name
        state = {k.decode(): int(v) for k, v in self.redis.hgetall(state_key(name)).items()}
        if "next" not in state:
            self._continue_numbering()
        complete = state.get("complete")
        base = force_base or complete is None or state.get("since_base", 0) >= self.base_every - 1
        version = int(self.redis.hincrby(state_key(name), "next", 1))
        request = PublishRequest(
            name, version, None if base else complete, complete, self.max_chunk_bytes
        )
        tables = self.model.tables()
        try:
            acks = self._stage(request, tables)
            bad = {k: a for k, a in acks.items() if a.status != "ok"}
            if bad and not base and all(a.status == "need_base" for a in bad.values()):
                raise _NeedBase(version, f"shards {sorted(bad)} have no change log")
            if bad:
                raise PublishError(
                    f"version {version}: shards failed to stage: "
                    + "; ".join(f"{k}: {a.status} {a.message}" for k, a in sorted(bad.items()))
                )
            out = self._produce(request, tables, acks, t0, state.get("base_offset"))
        finally:
            self._cleanup(request, tables)
        progress = {
            "complete": version,
            "since_base": 0 if base else state.get("since_base", 0) + 1,
        }
        if out.base_offset is not None:
            progress["base_offset"] = out.base_offset
        else:
            self.redis.hdel(state_key(name), "base_offset")
        self.redis.hset(state_key(name), mapping=progress)
        return out

    def _continue_numbering(self) -> None:
        """No state in Redis: number on from the newest manifest on the topic (if any).

        Without "complete" the next version is a base, so no delta builds on a parent
        that the shard servers' change logs and Redis may no longer agree on.
        """
        if self.last_manifest is None:
            return
        try:
            manifest = self.last_manifest()
        except PipelineError as exc:  # never guess: numbering from 1 freezes every subscriber
            raise PublishError(f"cannot read the newest version on {self.topic}: {exc}") from None
        if manifest is None:
            return  # a new model
        last = int(manifest["version"])
        if self.redis.hsetnx(state_key(self.model.name), "next", last):
            log.warning(
                "publisher state of model %s is not in Redis (restarted or flushed?): "
                "continuing after version %d found on %s, with a base",
                self.model.name,
                last,
                self.topic,
            )

    def _stage(self, request: PublishRequest, tables: dict[str, int]) -> dict[str, ShardAck]:
        """Place the request in every shard stream; wait for every shard's answer."""
        expected: set[str] = set()
        for table in tables:
            try:
                shards = self.ps.route(table).shards
            except ShardsNotReady as exc:  # e.g. Redis lost the registry: servers re-register
                raise PublishError(f"version {request.version}: {exc}") from None
            expected |= {f"{table}:{s}" for s in range(shards)}
            self.ps.barrier(table, request.barrier_name())
        key = acks_key(request.model, request.version)
        deadline = time.monotonic() + self.ack_timeout_s
        delay = 0.002
        while True:
            raw = self.redis.hgetall(key)
            acks = {k.decode(): ShardAck.from_json(v) for k, v in raw.items()}
            if expected <= set(acks):
                return {k: acks[k] for k in sorted(expected)}
            if time.monotonic() > deadline:
                missing = sorted(expected - set(acks))
                raise PublishError(
                    f"version {request.version}: shards {missing} did not stage within "
                    f"{self.ack_timeout_s:g} s (are their shard servers running?)"
                )
            time.sleep(delay)
            delay = min(2 * delay, 0.05)

    def _produce(
        self,
        request: PublishRequest,
        tables: dict[str, int],
        acks: dict[str, ShardAck],
        t0: float,
        parent_base_offset: int | None,
    ) -> PublishedVersion:
        name, version = request.model, request.version
        kind = "base" if request.parent is None else "delta"
        self._delivered_offsets = []
        counts: dict[str, int] = {}
        sums: dict[str, list[str]] = {}
        rows: dict[str, int] = {}
        dead: dict[str, int] = {}
        total = 0
        for table in tables:
            shard_acks = [
                (int(k.rsplit(":", 1)[1]), a) for k, a in acks.items() if k.startswith(f"{table}:")
            ]
            shard_acks.sort()
            pieces = [
                (shard, piece, i)
                for shard, ack in shard_acks
                for piece, n in (("r", ack.row_pieces), ("t", ack.tombstone_pieces))
                for i in range(n)
            ]
            counts[table], sums[table] = len(pieces), []
            rows[table] = sum(a.rows for _, a in shard_acks)
            dead[table] = sum(a.tombstones for _, a in shard_acks)
            for index, (shard, piece, i) in enumerate(pieces):
                payload = self.redis.get(piece_key(table, shard, name, version, piece, i))
                if payload is None:
                    raise PublishError(
                        f"version {version}: staged piece of {table}:{shard} expired"
                    )
                chunk_kind = "tombstone" if piece == "t" else kind
                total += len(payload)
                sums[table].append(
                    self._chunk(table, index, len(pieces), chunk_kind, payload, version)
                )
        dense_name = self.model.dense_table_name()
        dense_version, tensors = pull_dense(self.redis, dense_name)
        if not tensors:
            raise PublishError(
                f"dense table {dense_name!r} is empty: no trainer has pushed dense parameters yet"
            )
        pieces_d = split_bytes(pack_tensors(tensors), self.max_chunk_bytes)
        counts[dense_name], sums[dense_name] = len(pieces_d), []
        for index, payload in enumerate(pieces_d):
            total += len(payload)
            sums[dense_name].append(
                self._chunk(dense_name, index, len(pieces_d), "dense", payload, version)
            )
        self._flush(version)
        if kind == "base":  # where this base's first chunk landed (chunks are in order)
            base_offset = min(self._delivered_offsets, default=None)
        else:
            base_offset = parent_base_offset
        max_event_time = max((a.max_event_time for a in acks.values()), default=0)
        manifest = {
            "version": version,
            "parent_version": request.parent,
            "kind": kind,
            "chunk_counts": counts,
            "checksums": sums,
            "max_event_time": max_event_time,
            "offsets": _merge_offsets(acks.values()),
            "created_ms": self.clock_ms(),
            "base_offset": base_offset,
        }
        self._hold()  # never let a publisher that lost the lock complete a version
        self._produce_record(message(name, MANIFEST, manifest))
        self._flush(version)
        seconds = time.perf_counter() - t0
        log.info(
            "published %s version %d (%s, parent %s, dense v%d): %s rows, %s tombstones, "
            "%d bytes in %.2f s",
            name,
            version,
            kind,
            request.parent,
            dense_version,
            rows,
            dead,
            total,
            seconds,
        )
        return PublishedVersion(
            version,
            request.parent,
            kind,
            counts,
            rows,
            dead,
            max_event_time,
            total,
            seconds,
            sums,
            base_offset,
        )

    def _chunk(
        self, table: str, index: int, count: int, kind: str, payload: bytes, version: int
    ) -> str:
        digest = checksum(payload)
        record = {
            "version": version,
            "table": table,
            "chunk_index": index,
            "chunk_count": count,
            "kind": kind,
            "payload": payload,
            "checksum": digest,
        }
        self._produce_record(message(self.model.name, CHUNK, record))
        return digest

    def _produce_record(self, kwargs: dict[str, Any]) -> None:
        while True:
            try:
                self.producer.produce(self.topic, on_delivery=self._on_delivery, **kwargs)
                return
            except BufferError:  # local queue full: let deliveries drain
                self.producer.poll(0.1)

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._delivery_errors.append(str(err))
        elif msg.offset() is not None and msg.offset() >= 0:
            self._delivered_offsets.append(int(msg.offset()))

    def _flush(self, version: int) -> None:
        remaining = self.producer.flush(60)
        if remaining or self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors, []
            raise PublishError(
                f"version {version}: {remaining} messages undelivered, errors: {errors[:3]}"
            )

    def _cleanup(self, request: PublishRequest, tables: dict[str, int]) -> None:
        """Drop staged payloads and acks (they also expire on their own)."""
        key = acks_key(request.model, request.version)
        acks = {k.decode(): ShardAck.from_json(v) for k, v in self.redis.hgetall(key).items()}
        for where, ack in acks.items():
            table, shard = where.rsplit(":", 1)
            for piece, n in (("r", ack.row_pieces), ("t", ack.tombstone_pieces)):
                for i in range(n):
                    self.redis.delete(
                        piece_key(table, int(shard), request.model, request.version, piece, i)
                    )
        self.redis.delete(key)

    # -- the loop ------------------------------------------------------------
    def run(
        self,
        stop: threading.Event,
        interval_s: float,
        on_version: Callable[[PublishedVersion], None] | None = None,
    ) -> None:
        """Publish every ``interval_s`` until ``stop``; a failed version is logged and retried,
        at once with backoff while Redis is away."""
        try:
            run_every(
                stop, interval_s, self.publish, on_version, PublishError, log, outage=self.outage
            )
        finally:
            try:
                self.release()
            except redis_errors() as exc:
                log.warning("could not release the publisher lock (it expires): %s", exc)


class _NeedBase(Exception):
    def __init__(self, version: int, message: str) -> None:
        super().__init__(message)
        self.version = version


def _merge_offsets(acks: Any) -> list[dict[str, Any]]:
    """Per topic-partition, the highest next offset any shard has applied (see docs)."""
    merged: dict[tuple[str, int], int] = {}
    for ack in acks:
        for topic, parts in ack.offsets.items():
            for partition, offset in parts.items():
                key = (topic, int(partition))
                merged[key] = max(merged.get(key, 0), int(offset))
    return [{"topic": t, "partition": p, "offset": o} for (t, p), o in sorted(merged.items())]
