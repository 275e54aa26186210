"""Where trainer metrics go: Redis (mergeable counts), the metrics topic, Prometheus.

- :class:`RedisMetricsSink` keeps each trainer's latest cumulative counts and its
  per-window counts as :meth:`MetricCounts.to_bytes` blobs, so any reader can merge
  all trainers into exact global metrics (``pipeline metrics show``).
- :class:`MetricsPublisher` writes one ``Metric`` Avro record per metric to the
  compacted ``metrics`` topic; the ``auc`` record carries the bucket histogram so
  consumers can merge AUC across trainers too (:func:`merged_auc`).
- :class:`PrometheusExporter` serves gauges from its own registry.

Keys and record layout are documented in docs/metrics.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from pipeline.codec import avro
from pipeline.errors import PipelineError
from pipeline.ingest.delivery import Deliveries, ProducerStats, produce_message
from pipeline.train.metrics import (
    DEFAULT_BUCKETS,
    SUMMARY_KEYS,
    ClosedWindow,
    MetricCounts,
    bucketed_auc,
    unpack_auc_buckets,
)

__all__ = [
    "SCOPES",
    "MetricsPublisher",
    "PrometheusExporter",
    "RedisMetricsSink",
    "decode_metric",
    "merged_auc",
]

#: What a metric value covers: one window, one trainer since start, or all trainers.
SCOPES = ("window", "cumulative", "global")
#: Per-window blobs live this long in Redis (the cumulative ones until overwritten).
DEFAULT_WINDOW_TTL_S = 24 * 3600

_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _check_id(kind: str, value: str) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in "{}\n"):
        raise ValueError(f"{kind} must be a non-empty string without braces, got {value!r}")
    return value


class RedisMetricsSink:
    """Per-trainer metric counts in Redis, merged on read into global metrics.

    Every key carries the hash tag ``{job}``, so one job's keys share a Redis Cluster
    slot and one pipeline never crosses slots. Writes overwrite (a trainer publishes
    its whole cumulative counts each time), so re-publishing is idempotent.
    """

    def __init__(
        self, redis_client: Any, job: str, window_ttl_s: int = DEFAULT_WINDOW_TTL_S
    ) -> None:
        if window_ttl_s < 1:
            raise ValueError(f"window_ttl_s must be >= 1, got {window_ttl_s}")
        self.redis = redis_client
        self.job = _check_id("job", job)
        self.window_ttl_s = int(window_ttl_s)
        self.cum_key = f"metrics:{{{job}}}:cum"
        self.windows_key = f"metrics:{{{job}}}:windows"

    def window_key(self, start_ms: int) -> str:
        """Hash of the window starting at ``start_ms``: trainer id -> counts."""
        return f"metrics:{{{self.job}}}:win:{int(start_ms)}"

    def publish(
        self, trainer_id: str, cumulative: MetricCounts, window: ClosedWindow | None = None
    ) -> None:
        """Store ``trainer_id``'s cumulative counts (and a closed window's) in one round trip."""
        _check_id("trainer_id", trainer_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.cum_key, trainer_id, cumulative.to_bytes())
        if window is not None:
            key = self.window_key(window.window_start_ms)
            pipe.hset(key, trainer_id, window.counts.to_bytes())
            pipe.expire(key, self.window_ttl_s)
            pipe.zadd(self.windows_key, {str(window.window_start_ms): window.window_start_ms})
            oldest = window.window_start_ms - self.window_ttl_s * 1000
            pipe.zremrangebyscore(self.windows_key, "-inf", f"({oldest}")
            pipe.expire(self.windows_key, self.window_ttl_s)
        pipe.execute()

    def load(self, trainer_id: str) -> MetricCounts | None:
        """The last cumulative counts ``trainer_id`` published (to resume after a restart)."""
        blob = self.redis.hget(self.cum_key, _check_id("trainer_id", trainer_id))
        return None if blob is None else self._decode(trainer_id, blob)

    def trainers(self) -> list[str]:
        """Trainers that published cumulative counts, sorted."""
        return sorted(_text(name) for name in self.redis.hkeys(self.cum_key))

    def per_trainer(self) -> dict[str, MetricCounts]:
        """Each trainer's latest cumulative counts."""
        return self._decode_hash(self.redis.hgetall(self.cum_key))

    def global_cumulative(self, buckets: int = DEFAULT_BUCKETS) -> tuple[MetricCounts, list[str]]:
        """All trainers' cumulative counts merged, and the trainers merged (sorted)."""
        return self.merge(self.per_trainer(), buckets)

    def global_window(
        self, start_ms: int, buckets: int = DEFAULT_BUCKETS
    ) -> tuple[MetricCounts, list[str]]:
        """The window starting at ``start_ms`` merged over the trainers that closed it."""
        return self.merge(self._decode_hash(self.redis.hgetall(self.window_key(start_ms))), buckets)

    def windows(self, limit: int = 10) -> list[int]:
        """Start times (ms) of the latest ``limit`` windows still stored, newest first."""
        raw = self.redis.zrevrange(self.windows_key, 0, max(limit, 1) - 1)
        return [int(_text(member)) for member in raw]

    def _decode(self, trainer_id: str, blob: bytes) -> MetricCounts:
        try:
            return MetricCounts.from_bytes(blob)
        except ValueError as exc:
            raise PipelineError(
                f"metrics of trainer {trainer_id!r} in job {self.job!r} are unreadable: {exc}"
            ) from None

    def _decode_hash(self, raw: Mapping[Any, bytes]) -> dict[str, MetricCounts]:
        out = {}
        for name, blob in raw.items():
            trainer = _text(name)
            out[trainer] = self._decode(trainer, blob)
        return dict(sorted(out.items()))

    def merge(
        self, parts: Mapping[str, MetricCounts], buckets: int = DEFAULT_BUCKETS
    ) -> tuple[MetricCounts, list[str]]:
        """Counts of several trainers merged (``buckets`` only sizes an empty result)."""
        if not parts:
            return MetricCounts(buckets), []
        first = next(iter(parts.values()))
        total = MetricCounts(first.buckets)
        for trainer, counts in parts.items():
            if counts.buckets != total.buckets:
                raise PipelineError(
                    f"job {self.job!r}: trainer {trainer!r} uses {counts.buckets} metric "
                    f"buckets, others {total.buckets}; counts cannot be merged"
                )
            total.merge(counts)
        return total, list(parts)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


class MetricsPublisher:
    """One ``Metric`` record per summary metric to the (compacted) metrics topic.

    Key ``"<name>|<trainer_id>|<scope>"``: compaction keeps the latest value of each.
    """

    def __init__(self, producer: Any, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self._deliveries = Deliveries()

    @property
    def stats(self) -> ProducerStats:
        """Messages produced, delivered and failed so far."""
        return self._deliveries.snapshot()

    def publish(
        self,
        trainer_id: str,
        counts: MetricCounts,
        window_start_ms: int,
        window_end_ms: int,
        scope: str,
        labels: Mapping[str, str] | None = None,
    ) -> int:
        """Queue one record per metric of ``counts.summary()``; returns how many."""
        _check_id("trainer_id", trainer_id)
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        tags = {str(k): str(v) for k, v in (labels or {}).items()} | {"scope": scope}
        summary = counts.summary()
        for name in SUMMARY_KEYS:
            record = {
                "name": name,
                "window_start_ms": int(window_start_ms),
                "window_end_ms": int(window_end_ms),
                "trainer_id": trainer_id,
                "labels": tags,
                "value": float(summary[name]),
                "auc_buckets": counts.auc_buckets_bytes() if name == "auc" else None,
            }
            key = f"{name}|{trainer_id}|{scope}".encode()
            produce_message(
                self.producer, self._deliveries, self.topic, avro.encode("Metric", record), key=key
            )
        return len(SUMMARY_KEYS)

    def flush(self, timeout: float = 10.0) -> int:
        """Wait for delivery; returns how many messages are still queued (0 = all sent)."""
        return int(self.producer.flush(timeout))


def decode_metric(value: bytes) -> dict[str, Any]:
    """A ``Metric`` record from a message value (raises CodecError when malformed)."""
    return avro.decode("Metric", value)


def merged_auc(records: Iterable[Mapping[str, Any]]) -> float:
    """AUC over several ``auc`` records (e.g. one per trainer): histograms summed first."""
    pos: np.ndarray | None = None
    neg: np.ndarray | None = None
    for record in records:
        blob = record.get("auc_buckets")
        if blob is None:
            raise ValueError(f"record {record.get('name')!r} has no auc_buckets")
        p, n = unpack_auc_buckets(blob)
        if pos is None or neg is None:
            pos, neg = p.copy(), n.copy()
        elif p.size != pos.size:
            raise ValueError(f"auc_buckets of {p.size} and {pos.size} buckets cannot be merged")
        else:
            pos += p
            neg += n
    if pos is None or neg is None:
        return math.nan
    return bucketed_auc(pos, neg)


_HELP = {
    "auc": "AUC of progressive validation (bucketed scores)",
    "logloss": "Weighted mean log loss",
    "predicted_ctr": "Weighted mean predicted probability",
    "actual_ctr": "Weighted mean label",
    "copc": "Actual clicks / predicted clicks (1 = calibrated)",
    "bucket_error": "Relative calibration error over groups of prediction buckets",
    "mae": "Weighted mean absolute error",
    "rmse": "Root weighted mean squared error",
    "samples": "Rows scored (only grows for cumulative and global scopes)",
}


class PrometheusExporter:
    """Gauges ``pipeline_train_<metric>{job, trainer, scope}`` in a private registry.

    ``port=None`` keeps the registry without a server (:meth:`render` still works);
    ``port=0`` picks a free port (see :attr:`port` after :meth:`start`). It listens on
    ``addr`` (loopback unless told otherwise); with ``token``, ``/metrics`` needs
    ``Authorization: Bearer <token>`` (``/health`` stays open).
    """

    def __init__(
        self,
        port: int | None,
        trainer_id: str,
        job: str,
        addr: str = "127.0.0.1",
        token: str | None = None,
    ) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.requested_port = port
        self.addr = addr
        self.token = token
        self.trainer_id = _check_id("trainer_id", trainer_id)
        self.job = _check_id("job", job)
        self.port: int | None = None
        self.registry = CollectorRegistry()
        self._server: Any = None
        self._gauges: dict[str, Any] = {
            key: Gauge(
                f"pipeline_train_{key}",
                _HELP[key],
                ["job", "trainer", "scope"],
                registry=self.registry,
            )
            for key in SUMMARY_KEYS
        }
        self._extras: dict[str, tuple[Any, tuple[str, ...]]] = {}

    def start(self) -> PrometheusExporter:
        """Serve ``/metrics`` (no-op without a port)."""
        if self.requested_port is None or self._server is not None:
            return self
        from pipeline.metricshttp import MetricsHTTPServer

        try:
            self._server = MetricsHTTPServer(
                self.addr, self.requested_port, self.render, self.token
            )
        except OSError as exc:
            raise PipelineError(
                f"cannot serve Prometheus metrics on {self.addr}:{self.requested_port}: {exc}"
            ) from None
        self.port = self._server.port
        return self

    def set_summary(self, scope: str, summary: Mapping[str, float]) -> None:
        """Set every ``pipeline_train_<metric>`` gauge of ``scope`` from a summary dict."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        for key, gauge in self._gauges.items():
            if key in summary:
                gauge.labels(self.job, self.trainer_id, scope).set(float(summary[key]))

    def update(self, counts: MetricCounts, scope: str) -> None:
        """Set the gauges of ``scope`` from counts."""
        self.set_summary(scope, counts.summary())

    def set_extra(
        self,
        name: str,
        value: float,
        help: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Set gauge ``pipeline_train_<name>`` (created on first use, e.g. stage seconds).

        ``labels`` adds dimensions (e.g. ``{"reason": "avro_decode"}`` for dead letters);
        a name keeps the label names it was first used with. A name that already starts
        with ``pipeline_train_`` is not prefixed twice.
        """
        from prometheus_client import Gauge

        name = name.removeprefix("pipeline_train_")
        if not _NAME.match(name) or name in self._gauges:
            raise ValueError(f"invalid or reserved extra metric name {name!r}")
        extra = dict(labels or {})
        names = tuple(sorted(extra))
        for label in names:
            if not _NAME.match(label) or label in ("job", "trainer"):
                raise ValueError(f"invalid label name {label!r} for {name!r}")
        if name not in self._extras:
            gauge = Gauge(
                f"pipeline_train_{name}",
                help or name.replace("_", " "),
                ["job", "trainer", *names],
                registry=self.registry,
            )
            self._extras[name] = (gauge, names)
        gauge, known = self._extras[name]
        if names != known:
            raise ValueError(f"{name!r} has labels {list(known)}, got {list(names)}")
        gauge.labels(self.job, self.trainer_id, *(str(extra[k]) for k in names)).set(value)

    def render(self) -> bytes:
        """The exposition text of this registry (what ``/metrics`` serves)."""
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))

    def close(self) -> None:
        """Stop the HTTP server (if started)."""
        if self._server is not None:
            self._server.close()
            self._server = None

    def __enter__(self) -> PrometheusExporter:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()
