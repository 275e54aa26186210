"""The subscriber SDK: rebuild a published model from ``model.updates`` and keep it live.

Chunks are buffered per version until the version's manifest arrives; then the
whole version is verified (every table present, chunk counts, each chunk's
sha256 against the manifest) and decoded into a *new* :class:`LiveModel`, which
replaces the old one in one assignment. A base replaces everything; a delta
applies only on top of its parent. A gap (the parent is not the live version),
a corrupt or missing chunk, or an out-of-order version is reported as a
:class:`VersionEvent` and not applied; deltas are then skipped until the next
base re-syncs the model. The live model is never a mixture of versions.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.codec import avro
from pipeline.codec.errors import CodecError
from pipeline.errors import PipelineError
from pipeline.model.modules import CTRModel, build_model, load_dense_state
from pipeline.model.spec import ModelSpec
from pipeline.ps.dense import unpack_tensors
from pipeline.ps.staging.chunks import ChunkError, unpack_ids, unpack_rows, verify
from pipeline.publish.messages import CHUNK, CHUNK_SCHEMA, MANIFEST, MANIFEST_SCHEMA, header_map
from pipeline.retry import Outage

__all__ = ["LiveModel", "Subscriber", "VersionEvent", "last_manifest", "merge_rows"]

log = logging.getLogger(__name__)

U64 = npt.NDArray[np.uint64]
Rows = tuple[U64, npt.NDArray[np.floating]]


@dataclass(frozen=True)
class LiveModel:
    """One whole published version: sorted ids + rows per sparse table, dense params, module."""

    version: int
    manifest: dict[str, Any]
    tables: dict[str, Rows]
    dense: dict[str, npt.NDArray[np.float32]]
    module: CTRModel

    def lookup(
        self, table: str, ids: npt.ArrayLike
    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float32]]:
        """``(found, float32 rows)`` of ``ids``; missing ids read as zeros (not admitted)."""
        have, weights = self.tables[table]
        query = np.asarray(ids, dtype=np.uint64)
        pos = np.searchsorted(have, query)
        pos_c = np.minimum(pos, max(0, len(have) - 1))
        found = (
            (pos < len(have)) & (have[pos_c] == query) if len(have) else np.zeros(len(query), bool)
        )
        out = np.zeros((len(query), weights.shape[1]), np.float32)
        out[found] = weights[pos_c[found]]
        return found, out


@dataclass(frozen=True)
class VersionEvent:
    """What happened to one manifest: ``applied``, ``rejected`` (corrupt, incomplete,
    out of order) or ``skipped`` (a delta while waiting for a base)."""

    version: int
    kind: str
    status: str
    reason: str = ""
    parent: int | None = None
    max_event_time: int = 0
    freshness_ms: int | None = None
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class VersionRejected(ValueError):
    """A version failed verification or decoding (the message says which check)."""


def merge_rows(live: Rows, upserts: Rows, deletes: U64) -> Rows:
    """``live`` with ``upserts`` written over and ``deletes`` removed, sorted by id.

    ``live`` is left as it was (a serving reader may still hold it). Upsert ids are
    unique; an id both upserted and deleted is upserted. Cost: one copy of the rows
    plus O(changed x log rows) searches, no sort of the table, so a small delta on a
    large table stays cheap.
    """
    ids, weights = live
    up_ids, up_w = upserts
    dtype = up_w.dtype if len(up_w) else weights.dtype
    order = np.argsort(up_ids, kind="stable")
    up_ids, up_w = up_ids[order], up_w[order].astype(dtype, copy=False)
    deletes = deletes[~_present(up_ids, np.searchsorted(up_ids, deletes), deletes)]
    dpos = np.searchsorted(ids, deletes)
    gone = dpos[_present(ids, dpos, deletes)]
    new_ids, new_w = ids, weights
    if len(gone):
        keep = np.ones(len(ids), dtype=bool)
        keep[gone] = False
        new_ids, new_w = ids[keep], weights[keep]
    pos = np.searchsorted(new_ids, up_ids)
    fresh = ~_present(new_ids, pos, up_ids)
    if fresh.any():
        new_ids = np.insert(new_ids, pos[fresh], up_ids[fresh])
        new_w = np.insert(new_w, pos[fresh], up_w[fresh].astype(new_w.dtype), axis=0)
    new_w = new_w.astype(dtype, copy=False)
    if new_w is weights:
        new_w = weights.copy()  # never write into the live version
    new_w[np.searchsorted(new_ids, up_ids)] = up_w
    return new_ids, new_w


def _present(ids: U64, pos: npt.NDArray[np.intp], query: U64) -> npt.NDArray[np.bool_]:
    """Which ``query`` ids sit at their ``searchsorted`` position ``pos`` in ``ids``."""
    if not len(ids):
        return np.zeros(len(query), dtype=bool)
    return (pos < len(ids)) & (ids[np.minimum(pos, len(ids) - 1)] == query)


class Subscriber:
    """Applies ``model.updates`` records of ``model`` in order; holds :attr:`live`."""

    def __init__(
        self,
        model: ModelSpec,
        *,
        on_version: Callable[[VersionEvent, LiveModel | None], None] | None = None,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.model = model
        self.on_version = on_version
        self.clock_ms = clock_ms
        self.live: LiveModel | None = None
        self.events: list[VersionEvent] = []
        self._chunks: dict[int, dict[tuple[str, int], dict[str, Any]]] = {}
        self._consumer: Any = None
        self._broker = Outage("the broker (model.updates)", log)

    # -- records ---------------------------------------------------------------
    def handle(self, headers: list[tuple[str, bytes]] | None, value: bytes) -> VersionEvent | None:
        """Take one ``model.updates`` message; returns an event when it was a manifest."""
        head = header_map(headers)
        if head.get("model", self.model.name.encode()) != self.model.name.encode():
            return None  # another model on the shared topic
        kind = head.get("type")
        try:
            if kind == CHUNK:
                chunk = avro.decode(CHUNK_SCHEMA, value)
                self._chunks.setdefault(chunk["version"], {})[
                    (chunk["table"], chunk["chunk_index"])
                ] = chunk
                return None
            if kind != MANIFEST:
                log.warning("ignoring a model.updates message with type header %r", kind)
                return None
            manifest = avro.decode(MANIFEST_SCHEMA, value)
        except CodecError as exc:
            log.warning("undecodable model.updates message: %s", exc)
            return None  # a lost chunk shows up as a missing chunk at its manifest
        return self._on_manifest(manifest)

    def _on_manifest(self, manifest: dict[str, Any]) -> VersionEvent:
        t0 = time.perf_counter()
        version, kind, parent = manifest["version"], manifest["kind"], manifest["parent_version"]
        chunks = self._chunks.pop(version, {})
        # Versions before this one without a manifest by now never complete (one partition).
        self._chunks = {v: c for v, c in self._chunks.items() if v > version}
        status, reason, built = "applied", "", None
        live = self.live
        if live is not None and version <= live.version:
            status, reason = "rejected", f"out of order: version {version} <= live {live.version}"
        elif kind == "delta" and (live is None or live.version != parent):
            have = "nothing" if live is None else f"version {live.version}"
            status, reason = (
                "skipped",
                f"gap: delta needs parent {parent}, have {have}; waiting for a base",
            )
        else:
            try:
                built = self._build(manifest, chunks)
            except (VersionRejected, ChunkError, ValueError) as exc:
                status, reason = "rejected", str(exc)
        if built is not None:
            self.live = built
        now = self.clock_ms()
        met = int(manifest["max_event_time"])
        event = VersionEvent(
            version,
            kind,
            status,
            reason,
            parent,
            met,
            now - met if met > 0 else None,
            {t: len(r[0]) for t, r in built.tables.items()} if built else {},
            time.perf_counter() - t0,
        )
        if status != "applied":
            log.warning("model %s version %d %s: %s", self.model.name, version, status, reason)
        self.events.append(event)
        if self.on_version is not None:
            self.on_version(event, self.live)
        return event

    def _build(
        self, manifest: dict[str, Any], chunks: dict[tuple[str, int], dict[str, Any]]
    ) -> LiveModel:
        """Verify every chunk of the version and decode it into a new LiveModel."""
        counts, sums = manifest["chunk_counts"], manifest["checksums"]
        dense_name = self.model.dense_table_name()
        needed = [*self.model.tables(), dense_name]
        missing_tables = [t for t in needed if t not in counts]
        if missing_tables:
            raise VersionRejected(f"manifest lacks tables {missing_tables}")
        payloads: dict[str, list[dict[str, Any]]] = {}
        for table in needed:
            count = counts[table]
            if len(sums.get(table, [])) != count:
                raise VersionRejected(
                    f"{table}: {count} chunks but {len(sums.get(table, []))} checksums"
                )
            payloads[table] = []
            for index in range(count):
                chunk = chunks.get((table, index))
                if chunk is None:
                    raise VersionRejected(f"{table}: chunk {index} of {count} is missing")
                if chunk["chunk_count"] != count or chunk["checksum"] != sums[table][index]:
                    raise VersionRejected(f"{table}: chunk {index} disagrees with the manifest")
                verify(chunk["payload"], sums[table][index])
                payloads[table].append(chunk)
        base = manifest["kind"] == "base"
        live = self.live
        tables: dict[str, Rows] = {}
        for table, dim in self.model.tables().items():
            up, dead = _decode_table(table, payloads[table], manifest["kind"], dim)
            if base:
                if len(dead):
                    raise VersionRejected(f"{table}: a base carries tombstones")
                tables[table] = up
            else:
                assert live is not None  # checked by the caller
                tables[table] = merge_rows(live.tables[table], up, dead)
        blob = b"".join(c["payload"] for c in payloads[dense_name])
        dense = unpack_tensors(blob)
        module = build_model(self.model)
        load_dense_state(module, dense)  # ValueError on names/shapes that do not fit
        module.eval()
        return LiveModel(manifest["version"], manifest, tables, dense, module)

    # -- Kafka -----------------------------------------------------------------
    def attach(self, consumer: Any, topic: str, *, from_latest_base: bool = True) -> None:
        """Read ``topic`` (one partition) with ``consumer`` (no commits).

        With ``from_latest_base`` (the default) reading starts at the first chunk of the
        base that the newest manifest of this model builds on (its ``base_offset``),
        so a new subscriber applies one base and the deltas after it instead of the
        whole retained history. Without it, or when no manifest names a base that is
        still retained, reading starts at the beginning.
        """
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        start = self.latest_base_offset(consumer, topic) if from_latest_base else None
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING if start is None else start)])
        self._consumer = consumer

    def latest_base_offset(self, consumer: Any, topic: str, timeout_s: float = 10.0) -> int | None:
        """``base_offset`` of this model's newest manifest in ``topic``; None when there is
        none or it is no longer retained."""
        found = self.latest_manifest(consumer, topic, timeout_s)
        if found is None:
            return None
        manifest, low = found
        base = manifest.get("base_offset")
        return int(base) if base is not None and base >= low else None

    def latest_manifest(
        self, consumer: Any, topic: str, timeout_s: float = 10.0, *, strict: bool = False
    ) -> tuple[dict[str, Any], int] | None:
        """(this model's newest manifest in ``topic``, the partition's low watermark), read
        backwards in growing windows from the end; None when the topic holds none.

        ``strict``: a window that could not be read whole raises :class:`PipelineError`
        instead of counting as "no manifest there"."""
        from pipeline.ingest.timeseek import watermarks  # the end verified by a fetch

        low, high = watermarks(consumer, topic, 0, timeout_s)
        end, window = high, 16  # the newest message is usually a manifest
        while end > low:
            begin = max(low, end - window)
            manifest = self._last_manifest(consumer, topic, begin, end, timeout_s, strict)
            if manifest is not None:
                return manifest, low
            end, window = begin, window * 4
        return None

    def _last_manifest(
        self,
        consumer: Any,
        topic: str,
        begin: int,
        end: int,
        timeout_s: float,
        strict: bool = False,
    ) -> dict[str, Any] | None:
        """The last manifest of this model among offsets ``[begin, end)``."""
        from confluent_kafka import TopicPartition

        consumer.assign([TopicPartition(topic, 0, begin)])
        found: dict[str, Any] | None = None
        deadline = time.monotonic() + timeout_s
        last = begin - 1
        while last < end - 1 and time.monotonic() < deadline:
            for msg in consumer.consume(256, 0.5):
                if msg.error() is not None or msg.offset() >= end:
                    continue
                last = max(last, msg.offset())
                head = header_map(msg.headers())
                if head.get("type") == MANIFEST and head.get("model") == self.model.name.encode():
                    try:
                        found = avro.decode(MANIFEST_SCHEMA, msg.value())
                    except CodecError:
                        continue
        consumer.unassign()
        if strict and last < end - 1:
            raise PipelineError(f"{topic}: could not read offsets {last + 1}..{end - 1} in time")
        return found

    @classmethod
    def connect(
        cls,
        settings: Any,
        topic: str,
        model: ModelSpec,
        *,
        from_latest_base: bool = True,
        **kwargs: Any,
    ) -> Subscriber:
        """A subscriber with its own consumer (``settings``: KafkaSettings) reading ``topic``."""
        from pipeline.kafka import consumer

        sub = cls(model, **kwargs)
        sub.attach(
            consumer(settings, f"subscriber-{uuid.uuid4().hex[:8]}"),
            topic,
            from_latest_base=from_latest_base,
        )
        return sub

    def poll(self, timeout_s: float = 1.0, max_messages: int = 256) -> list[VersionEvent]:
        """Consume what is there (waiting up to ``timeout_s``); events of manifests seen."""
        if self._consumer is None:
            raise RuntimeError("attach() or connect() the subscriber first")
        out = []
        for msg in self._consumer.consume(max_messages, timeout_s):
            error = msg.error()
            if error is not None:
                if _broker_away(error):  # librdkafka reconnects: one line per outage
                    self._broker.failed(RuntimeError(str(error)))
                else:
                    log.warning("model.updates: %s", error)
                continue
            self._broker.ok()
            event = self.handle(msg.headers(), msg.value())
            if event is not None:
                out.append(event)
        return out

    def run(self, stop: threading.Event, timeout_s: float = 0.5) -> None:
        """Poll until ``stop`` is set."""
        while not stop.is_set():
            self.poll(timeout_s)

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


def _broker_away(error: Any) -> bool:
    from confluent_kafka import KafkaError

    return error.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN)


def last_manifest(settings: Any, topic: str, model: ModelSpec) -> dict[str, Any] | None:
    """The newest manifest of ``model`` in ``topic`` (``settings``: KafkaSettings), or None.

    What the publisher continues from when its state in Redis is gone.
    """
    from pipeline.kafka import consumer

    reader = consumer(settings, f"publisher-recovery-{uuid.uuid4().hex[:8]}")
    try:
        found = Subscriber(model).latest_manifest(reader, topic, strict=True)
    finally:
        reader.close()
    return None if found is None else found[0]


def _decode_table(
    table: str, chunks: list[dict[str, Any]], kind: str, dim: int
) -> tuple[Rows, U64]:
    """(upserted rows, deleted ids) of one table's chunks in one version."""
    ids: list[U64] = []
    weights: list[npt.NDArray[np.floating]] = []
    dead: list[U64] = []
    for chunk in chunks:
        if chunk["kind"] == "tombstone":
            dead.append(unpack_ids(chunk["payload"]))
            continue
        if chunk["kind"] != kind:
            raise VersionRejected(f"{table}: {chunk['kind']} chunk in a {kind} version")
        i, w = unpack_rows(chunk["payload"])
        if w.shape[1] != dim:
            raise VersionRejected(f"{table}: rows of dim {w.shape[1]}, model expects {dim}")
        ids.append(i)
        weights.append(w)
    up_ids = np.concatenate(ids) if ids else np.zeros(0, np.uint64)
    up_w = np.concatenate(weights) if weights else np.zeros((0, dim), np.float32)
    order = np.argsort(up_ids, kind="stable")  # shards' runs are sorted: a cheap merge
    up_ids, up_w = up_ids[order], up_w[order]
    if len(up_ids) > 1 and bool((up_ids[1:] == up_ids[:-1]).any()):
        raise VersionRejected(f"{table}: duplicate ids in one version")
    gone = np.concatenate(dead) if dead else np.zeros(0, np.uint64)
    return (up_ids, up_w), gone
