"""Producer SDK: row events for the joiner and row-wise samples batched into SampleBatch.

:class:`EventProducer` sends Impression/Click records keyed by ``request_id``, so an
impression and its clicks land in the same partition of their (equally partitioned)
topics. :class:`SampleProducer` turns row-wise samples into columnar SampleBatch
messages, the only form the ``samples`` topic carries. Both pass any librdkafka
property through (``**{"sasl.mechanism": "PLAIN"}``), count deliveries and flush on
exit. Bad input raises :class:`~pipeline.codec.CodecError` at the call that gave it,
so one bad row never poisons a batch: labels other than 0 or 1, negative or far-future
event times, non-finite values, and messages above the topic's declared
``max.message.bytes`` (:mod:`pipeline.ingest.limits`; sample batches are split to fit
instead). See ``docs/ingest-producing.md``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, NoReturn

import numpy as np
import xxhash

from pipeline import kafka
from pipeline.codec import avro
from pipeline.codec.errors import CodecError
from pipeline.codec.hashing import HASH_SEED, SEPARATOR, value_bytes
from pipeline.codec.samplebatch import SampleBatch, from_rows
from pipeline.codec.slots import SlotConfig
from pipeline.codec.validation import check_event_time, validate_trainable
from pipeline.config import KafkaSettings
from pipeline.errors import PipelineError
from pipeline.ingest.delivery import (
    Deliveries,
    DeliveryHook,
    ProducerStats,
    partition_for,
    produce_message,
)
from pipeline.ingest.limits import FRAMING_BYTES, check_size, declared_limit, encode_within

__all__ = [
    "Deliveries",
    "DeliveryHook",
    "EventProducer",
    "KeyFn",
    "ProducerStats",
    "SampleProducer",
    "partition_for",
    "produce_message",
]

log = logging.getLogger(__name__)

#: Maps the features given to ``send`` (or the raw values given to ``send_raw``) to a
#: partitioning key (str, bytes or int); None sends the row unkeyed.
KeyFn = Callable[[Mapping[str, Any]], object]

_U64_MAX = (1 << 64) - 1
_I64 = (-(1 << 63), (1 << 63) - 1)


class _Closing:
    """Context-manager protocol shared by the producers: ``close()`` on exit."""

    def close(self, timeout: float = 30.0) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # keep the original exception; still deliver what was accepted before it
            self.close()
        except PipelineError as err:
            log.error("while closing after %s: %s", exc_type.__name__, err)


class EventProducer(_Closing):
    """Validated, Avro-encoded Impression/Click records, keyed by ``request_id``."""

    def __init__(
        self,
        settings: KafkaSettings,
        impressions_topic: str = "events.impressions",
        clicks_topic: str = "events.clicks",
        *,
        on_delivery: DeliveryHook | None = None,
        max_message_bytes: int | None = None,
        **librdkafka_overrides: Any,
    ) -> None:
        """``max_message_bytes`` (default: each topic's declared limit) caps key + value."""
        self.impressions_topic = impressions_topic
        self.clicks_topic = clicks_topic
        self._limits = {
            t: max_message_bytes or declared_limit(t) for t in (impressions_topic, clicks_topic)
        }
        self._producer = kafka.producer(settings, **librdkafka_overrides)
        self._deliveries = Deliveries(on_delivery)
        self._closed = False

    def impression(self, record: Mapping[str, Any]) -> None:
        """Send one Impression; CodecError (``schema_mismatch``, ``bad_event_time``,
        ``too_large``) when it cannot be joined or sent."""
        self._send("Impression", self.impressions_topic, record)

    def click(self, record: Mapping[str, Any]) -> None:
        """Send one Click; CodecError as for :meth:`impression`."""
        self._send("Click", self.clicks_topic, record)

    def _send(self, schema: str, topic: str, record: Mapping[str, Any]) -> None:
        if self._closed:
            raise PipelineError("EventProducer is closed")
        value = avro.encode(schema, dict(record) if isinstance(record, Mapping) else record)
        check_event_time(int(record["event_time"]))
        key = str(record["request_id"]).encode("utf-8")
        check_size(topic, value, key, self._limits[topic])
        produce_message(self._producer, self._deliveries, topic, value, key=key, rows=1)

    @property
    def stats(self) -> ProducerStats:
        """Counts so far (messages, bytes, delivered, failed)."""
        return self._deliveries.snapshot()

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for delivery of everything sent; returns how many are still undelivered."""
        return int(self._producer.flush(timeout))

    def close(self, timeout: float = 30.0) -> None:
        """Flush; PipelineError when messages are still undelivered after ``timeout``."""
        if self._closed:
            return
        self._closed = True
        left = self.flush(timeout)
        if left:
            raise PipelineError(f"{left} event(s) still undelivered after {timeout:g} s")


class _Rows:
    """Rows buffered for one partition (or for unkeyed sends) until they become a batch."""

    __slots__ = ("dense", "features", "labels", "opened_at", "times", "weights")

    def __init__(self) -> None:
        self.labels: list[float] = []
        self.weights: list[float] = []
        self.times: list[int] = []
        self.features: list[dict[str, Any]] = []
        self.dense: list[Sequence[float]] = []
        self.opened_at = time.monotonic()

    def __len__(self) -> int:
        return len(self.labels)


class SampleProducer(_Closing):
    """Row-wise samples in, columnar SampleBatch messages out (by count or linger time).

    A background thread sends partial batches once they are ``linger_ms`` old and serves
    delivery callbacks. With ``key``, rows are buffered per partition (CRC32 of the key
    modulo the partition count, librdkafka's default partitioner), so one user's rows
    stay in one partition; without it batches go to partitions at random.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        config: SlotConfig,
        topic: str = "samples",
        batch_rows: int = 1024,
        linger_ms: float = 200,
        key: KeyFn | None = None,
        *,
        on_delivery: DeliveryHook | None = None,
        max_message_bytes: int | None = None,
        **librdkafka_overrides: Any,
    ) -> None:
        """``max_message_bytes`` (default: the topic's declared limit) caps each message;
        batches above it go out as several smaller ones."""
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
        if linger_ms < 0:
            raise ValueError(f"linger_ms must be >= 0, got {linger_ms}")
        self.config = config
        self.topic = topic
        self.batch_rows = batch_rows
        self.linger_s = linger_ms / 1000.0
        self._key = key
        self.max_message_bytes = max_message_bytes or declared_limit(topic)
        # a generous bound on the bytes of a batch besides its rows (names, lengths)
        self._batch_overhead = 1024 + sum(len(s.encode("utf-8")) + 8 for s in config.slots)
        self._index = {name: s for s, name in enumerate(config.slots)}
        self._prefixes = {name: name.encode("utf-8") + SEPARATOR for name in config.slots}
        self._producer = kafka.producer(settings, **librdkafka_overrides)
        self._deliveries = Deliveries(on_delivery)
        self._buffers: dict[int | None, _Rows] = {}
        self._partitions: int | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._closed = False

    # -- row intake ---------------------------------------------------------------

    def send(
        self,
        label: float,
        features: Mapping[str, int | Sequence[int] | np.ndarray[Any, Any]],
        event_time: int,
        weight: float = 1.0,
        dense: Sequence[float] | None = None,
    ) -> None:
        """Buffer one sample of ``{slot: uint64 id or ids}``; CodecError on a bad value."""
        if not isinstance(features, Mapping):
            raise CodecError("schema_mismatch", "features must be a mapping of slot -> ids")
        ids = dict(features)
        index, top = self._index, _U64_MAX
        many = 0  # ids of the slots holding several (the others hold one each)
        for slot, values in ids.items():
            if not (type(values) is int and 0 <= values <= top and slot in index):  # fast path
                checked = ids[slot] = self._checked_ids(slot, values)
                many += 1 if type(checked) is int else len(checked)
        self._append(label, ids, event_time, weight, dense, features, many)

    def send_raw(
        self,
        label: float,
        raw: Mapping[str, Any],
        event_time: int,
        weight: float = 1.0,
        dense: Sequence[float] | None = None,
    ) -> None:
        """Like :meth:`send` with raw values (or lists of them) hashed by ``hash64(slot, v)``.

        A None value means the slot is absent from this row.
        """
        if not isinstance(raw, Mapping):
            raise CodecError("schema_mismatch", "raw must be a mapping of slot -> raw values")
        ids: dict[str, Any] = {}
        many = 0
        digest, seed = xxhash.xxh64_intdigest, HASH_SEED
        for slot, value in raw.items():
            # hash64(slot, v) without re-encoding the slot name for every value
            prefix = self._prefixes.get(slot) or self._unknown_slot(slot)
            if value is None:
                continue
            try:
                if isinstance(value, list | tuple):
                    ids[slot] = [digest(prefix + value_bytes(v), seed) for v in value]
                    many += len(value)
                else:
                    ids[slot] = digest(prefix + value_bytes(value), seed)
            except TypeError as exc:
                raise CodecError("schema_mismatch", f"slot {slot!r}: {exc}") from None
        self._append(label, ids, event_time, weight, dense, raw, many)

    def send_batch(self, batch: SampleBatch, key: bytes | str | None = None) -> None:
        """Send a pre-built batch (validated against this producer's SlotConfig and for
        training); above the size limit it goes out as several messages, in order."""
        self._check_open()
        batch.validate(self.config)
        validate_trainable(batch)
        kb = key.encode("utf-8") if isinstance(key, str) else key
        parts = list(encode_within(batch, self.topic, self.max_message_bytes, kb))
        for part, value in parts:
            produce_message(
                self._producer, self._deliveries, self.topic, value, key=kb, rows=part.num_rows
            )

    # -- lifecycle ----------------------------------------------------------------

    @property
    def stats(self) -> ProducerStats:
        """Counts so far (rows/batches/bytes sent, delivered, failed)."""
        return self._deliveries.snapshot()

    @property
    def pending_rows(self) -> int:
        """Rows buffered and not yet handed to Kafka."""
        with self._lock:
            return sum(len(b) for b in self._buffers.values())

    def flush(self, timeout: float = 30.0) -> int:
        """Send every partial batch, wait for delivery; returns messages still undelivered.

        Raises PipelineError if building or sending a batch failed since the last call.
        """
        with self._lock:
            for part in list(self._buffers):
                self._send_buffer(part)
        left = int(self._producer.flush(timeout))
        self._raise_failure()
        return left

    def close(self, timeout: float = 30.0) -> None:
        """Stop the linger thread and flush; PipelineError if anything was not delivered."""
        if self._closed:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            left = self.flush(timeout)
        finally:
            self._closed = True
        if left:
            raise PipelineError(f"{left} sample batch(es) still undelivered after {timeout:g} s")

    # -- internals ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PipelineError("SampleProducer is closed")
        self._raise_failure()

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise PipelineError(f"sending a sample batch failed: {failure}") from failure

    def _slot_index(self, slot: str) -> int:
        index = self._index.get(slot)
        return self._unknown_slot(slot) if index is None else index

    def _unknown_slot(self, slot: str) -> NoReturn:
        raise CodecError("unknown_slot", f"slot {slot!r} not in {list(self.config.slots)}")

    def _checked_ids(self, slot: str, values: Any) -> Any:
        """``values`` as one id or a list/array of ids, each within uint64."""
        self._slot_index(slot)
        if type(values) is int:  # fast paths first: this runs for every slot of every row
            if 0 <= values <= _U64_MAX:
                return values
        elif isinstance(values, list | tuple):
            if all(type(v) is int and 0 <= v <= _U64_MAX for v in values):
                return values
            if all(_is_id(v) for v in values):
                return [int(v) for v in values]
        elif isinstance(values, np.ndarray):
            if values.dtype == np.uint64 and values.ndim == 1:
                return values
            if values.dtype.kind in "iu" and values.ndim == 1 and not (values < 0).any():
                return values.astype(np.uint64)
        elif _is_id(values):
            return int(values)
        raise CodecError("bad_id", f"slot {slot!r}: {values!r} is not a uint64 id or list of them")

    def _append(
        self,
        label: float,
        ids: dict[str, Any],
        event_time: int,
        weight: float,
        dense: Sequence[float] | None,
        keyed_on: Mapping[str, Any],
        many_ids: int = 0,
    ) -> None:
        self._check_open()
        try:
            label_f, weight_f, row_dense = (
                float(label),
                float(weight),
                [float(v) for v in dense or ()],
            )
        except (TypeError, ValueError) as exc:
            raise CodecError(
                "bad_dtype", f"label, weight and dense must be numbers: {exc}"
            ) from None
        if not (math.isfinite(label_f) and math.isfinite(weight_f) and _all_finite(row_dense)):
            raise CodecError("non_finite", "NaN or infinity in label, weight or dense")
        if label_f != 0.0 and label_f != 1.0:
            raise CodecError("bad_label", f"label {label_f:g}: labels must be 0 or 1")
        if weight_f < 0:
            raise CodecError("negative_weight", f"weight {weight_f} < 0")
        if len(row_dense) != self.config.dense_dim:
            want = self.config.dense_dim
            raise CodecError("length_mismatch", f"dense: {len(row_dense)} values, expected {want}")
        if not (_is_id(event_time, _I64[0]) and int(event_time) <= _I64[1]):
            raise CodecError("bad_dtype", f"event_time must be an int64 of ms, got {event_time!r}")
        check_event_time(int(event_time))
        if self.max_message_bytes is not None and many_ids:
            self._check_row_size(many_ids + len(ids), len(row_dense))
        part = self._partition(keyed_on)
        with self._lock:
            buf = self._buffers.get(part)
            if buf is None:
                buf = self._buffers[part] = _Rows()
            buf.labels.append(label_f)
            buf.weights.append(weight_f)
            buf.times.append(int(event_time))
            buf.features.append(ids)
            buf.dense.append(row_dense)
            full = len(buf) >= self.batch_rows
            if full or time.monotonic() - buf.opened_at >= self.linger_s:
                self._send_buffer(part)
        self._ensure_thread()

    def _check_row_size(self, num_ids: int, dense_dim: int) -> None:
        """CodecError ``too_large`` when one row alone would not fit in a message."""
        assert self.max_message_bytes is not None
        row = 16 + 4 * len(self.config.slots) + 8 * num_ids + 4 * dense_dim
        if row + self._batch_overhead + FRAMING_BYTES > self.max_message_bytes:
            raise CodecError(
                "too_large",
                f"a row of {num_ids:,} ids (about {row:,} bytes) cannot fit in a message of "
                f"{self.topic} (max.message.bytes {self.max_message_bytes:,})",
            )

    def _partition(self, keyed_on: Mapping[str, Any]) -> int | None:
        if self._key is None:
            return None
        key = self._key(keyed_on)
        if key is None:
            return None
        if self._partitions is None:
            self._partitions = _partition_count(self._producer, self.topic)
        return partition_for(key, self._partitions)

    def _send_buffer(self, part: int | None) -> None:
        """Encode and hand one buffer to librdkafka (caller holds the lock)."""
        buf = self._buffers.pop(part, None)
        if not buf:
            return
        try:
            batch = from_rows(
                self.config,
                buf.labels,
                buf.features,
                buf.times,
                weights=buf.weights,
                dense=buf.dense if self.config.dense_dim else None,
            )
            parts = list(encode_within(batch, self.topic, self.max_message_bytes))
        except Exception as exc:  # rows were checked one by one, so this is a bug: count it
            self._deliveries.lost(len(buf), str(exc))
            raise
        for rows, value in parts:
            produce_message(
                self._producer,
                self._deliveries,
                self.topic,
                value,
                rows=rows.num_rows,
                partition=part,
            )

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._linger_loop, name=f"sample-linger-{self.topic}", daemon=True
            )
            self._thread.start()

    def _linger_loop(self) -> None:
        """Send buffers older than the linger time; serve delivery callbacks meanwhile."""
        tick = min(max(self.linger_s / 4, 0.005), 0.05)
        while not self._stop.wait(tick):
            try:
                with self._lock:
                    now = time.monotonic()
                    due = [
                        p for p, b in self._buffers.items() if now - b.opened_at >= self.linger_s
                    ]
                    for part in due:
                        self._send_buffer(part)
                self._producer.poll(0)
            except Exception as exc:  # surfaced by the next send/flush/close
                log.exception("sending a lingering sample batch failed")
                self._failure = exc


def _is_id(value: Any, low: int = 0) -> bool:
    """An int (not bool) from ``low`` up to 2**64-1."""
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
    return ok and low <= int(value) <= _U64_MAX


def _all_finite(values: list[float]) -> bool:
    return all(map(math.isfinite, values))


def _partition_count(producer: Any, topic: str) -> int:
    """Partitions of ``topic`` from cluster metadata; PipelineError when it is missing."""
    meta = producer.list_topics(topic, timeout=10)
    info = meta.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        why = info.error.str() if info is not None and info.error is not None else "no partitions"
        raise PipelineError(f"cannot key rows for topic {topic}: {why}")
    return len(info.partitions)
