"""Shard-side change tracking and staging of published versions.

A shard server keeps one :class:`PublishTracker` per table. It records the ids
whose serving row may have changed (admitted rows touched by a push, rows
deleted by eviction) and, when a publish request reaches it through the grad
stream, stages the shard's part of the version in Redis and acknowledges.

Change logs are kept per model and per staged version ("segments"), so a delta
is always relative to the last *complete* version: if a version is staged but
its manifest never goes out (the publisher died), the next delta still covers
its changes. A tracker starts logging for a model at its first request, which
must therefore be a base; after a server restart the log is gone and the shard
answers ``need_base``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.arrayops import unique
from pipeline.ps.keys import ShardKeys
from pipeline.ps.staging.chunks import split_ids, split_rows
from pipeline.ps.staging.requests import (
    PREFIX,
    STAGE_TTL_MS,
    PublishRequest,
    ShardAck,
    acks_key,
    piece_key,
)
from pipeline.ps.table import ShardTable

__all__ = ["PublishTracker", "serving_rows"]

log = logging.getLogger(__name__)

U64 = npt.NDArray[np.uint64]
_COMPACT_EVERY = 256  # pending arrays merged (np.unique) once this many pile up


def serving_rows(table: ShardTable, only: U64 | None = None) -> tuple[U64, npt.NDArray[np.float32]]:
    """Sorted ``(ids, weights)`` of rows a subscriber serves: admitted and score >=
    ``serving.min_score``; restricted to ``only`` (sorted unique) when given.

    With ``only`` (a delta) the rows are looked up by id, so the cost follows the
    changed ids, not the table size; without it (a base) the whole table is read.
    """
    min_score = np.float32(table.spec.serving.min_score)
    batches = [table.rows_of(only)] if only is not None else table.export_rows()
    ids_out: list[U64] = []
    w_out: list[npt.NDArray[np.float32]] = []
    for batch in batches:
        keep = batch.admitted & (table.accessor.score(batch.show, batch.click) >= min_score)
        ids_out.append(batch.ids[keep])
        w_out.append(batch.weights[keep])
    if not ids_out:
        return np.zeros(0, np.uint64), np.zeros((0, table.dim), np.float32)
    ids, weights = np.concatenate(ids_out), np.concatenate(w_out)
    order = np.argsort(ids, kind="stable")
    return ids[order], weights[order]


@dataclass
class _ModelLog:
    pending: list[U64] = field(default_factory=list)
    segments: dict[int, U64] = field(default_factory=dict)  # version -> changed before its cut
    staged: set[int] = field(default_factory=set)

    def add(self, ids: U64) -> None:
        if len(ids):
            self.pending.append(ids)
            if len(self.pending) >= _COMPACT_EVERY:
                self.pending = [unique(np.concatenate(self.pending))]

    def cut(self, version: int) -> None:
        self.segments[version] = _union(self.pending)
        self.pending = []
        self.staged.add(version)

    def prune(self, complete: int | None) -> None:
        if complete is None:
            return
        self.segments = {v: s for v, s in self.segments.items() if v > complete}
        self.staged = {v for v in self.staged if v >= complete}

    def changed_since(self, parent: int) -> U64:
        return _union([s for v, s in self.segments.items() if v > parent])


def _union(parts: list[U64]) -> U64:
    return unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)


class PublishTracker:
    """Change log + staging for one (table, shard); driven by the shard server's thread."""

    def __init__(self) -> None:
        self._logs: dict[str, _ModelLog] = {}
        self.max_event_time = 0
        self.offsets: dict[str, dict[str, int]] = {}

    def record(self, changed_ids: U64, max_event_time: int, offsets: dict[str, Any]) -> None:
        """An applied push: ids whose weights changed, and what input it covers."""
        for model_log in self._logs.values():
            model_log.add(changed_ids)
        self.max_event_time = max(self.max_event_time, int(max_event_time))
        for topic, parts in offsets.items():
            mine = self.offsets.setdefault(str(topic), {})
            for partition, offset in parts.items():
                key = str(partition)
                mine[key] = max(mine.get(key, 0), int(offset))

    def record_deleted(self, ids: U64) -> None:
        """Rows evicted by shrink: published as tombstones."""
        for model_log in self._logs.values():
            model_log.add(ids)

    def on_barrier(
        self, client: Any, keys: ShardKeys, table: ShardTable, name: str | None
    ) -> ShardAck | None:
        """Stage a version if barrier ``name`` is a publish request (else do nothing)."""
        if not name or not name.startswith(PREFIX):
            return None
        try:
            request = PublishRequest.parse(name)
        except ValueError as exc:
            log.warning("%s: ignoring malformed publish request: %s", keys.tag, exc)
            return None
        return self.stage(client, keys, table, request)

    def stage(
        self, client: Any, keys: ShardKeys, table: ShardTable, request: PublishRequest
    ) -> ShardAck:
        """Stage this shard's part of ``request`` in Redis and acknowledge it (never raises)."""
        try:
            ack = self._stage(client, keys, table, request)
        except Exception as exc:  # a failed stage must not stop the shard server
            log.error("%s: staging version %d failed", keys.tag, request.version, exc_info=True)
            ack = ShardAck("error", message=f"{type(exc).__name__}: {exc}")
        try:
            pipe = client.pipeline(transaction=False)
            akey = acks_key(request.model, request.version)
            pipe.hset(akey, f"{keys.table}:{keys.shard}", ack.to_json())
            pipe.pexpire(akey, STAGE_TTL_MS)
            pipe.execute()
        except Exception:
            log.error("%s: could not acknowledge version %d", keys.tag, request.version)
        return ack

    def _stage(
        self, client: Any, keys: ShardKeys, table: ShardTable, request: PublishRequest
    ) -> ShardAck:
        model_log = self._logs.get(request.model)
        if model_log is None:
            model_log = self._logs[request.model] = _ModelLog()
        model_log.prune(request.complete)
        parent = request.parent
        if parent is not None and parent not in model_log.staged:
            model_log.cut(request.version)  # keep logging from here; the publisher sends a base
            return ShardAck("need_base", message=f"no change log since version {parent}")
        model_log.cut(request.version)
        fp16 = table.spec.serving.fp16
        size = request.max_chunk_bytes
        if parent is None:
            ids, weights = serving_rows(table)
            dead = np.zeros(0, np.uint64)
        else:
            changed = model_log.changed_since(parent)
            ids, weights = serving_rows(table, changed)
            dead = np.setdiff1d(changed, ids, assume_unique=True)
        pipe = client.pipeline(transaction=False)
        pieces = {"r": 0, "t": 0}
        payloads = [("r", p) for p in split_rows(ids, weights, fp16=fp16, max_bytes=size)]
        payloads += [("t", p) for p in split_ids(dead, max_bytes=size)]
        for kind, payload in payloads:
            key = piece_key(
                keys.table, keys.shard, request.model, request.version, kind, pieces[kind]
            )
            pipe.set(key, payload, px=STAGE_TTL_MS)
            pieces[kind] += 1
            if len(pipe) >= 16:
                pipe.execute()
        pipe.execute()
        return ShardAck(
            "ok",
            row_pieces=pieces["r"],
            tombstone_pieces=pieces["t"],
            rows=int(ids.shape[0]),
            tombstones=int(dead.shape[0]),
            max_event_time=self.max_event_time,
            offsets=self.offsets,
        )
