"""The trainer role: wires Kafka, the PS client, the trainer and the metrics sinks.

``pipeline train`` is a thin CLI over :func:`run_trainer`; tests and the
end-to-end job call the same function in subprocesses.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pipeline import kafka as kafka_io
from pipeline.codec.slots import SlotConfig
from pipeline.config import KafkaSettings, RedisSettings
from pipeline.errors import PipelineError
from pipeline.ingest.dlq import DeadLetterWriter
from pipeline.model.spec import ModelSpec
from pipeline.ps.catalog import load_catalog
from pipeline.ps.client import PSClient
from pipeline.ps.frontclient import connect
from pipeline.retry import retrying
from pipeline.train.dataset import QueueDataset
from pipeline.train.dense_recovery import DenseRecovery
from pipeline.train.metrics import WindowedMetrics, progress_line
from pipeline.train.metrics_sink import MetricsPublisher, PrometheusExporter, RedisMetricsSink
from pipeline.train.settings import TrainerSettings
from pipeline.train.trainer import Trainer, TrainResult, pick_device

__all__ = ["TrainerRole", "default_model_path", "load_model_spec", "run_trainer"]

log = logging.getLogger(__name__)

MODEL_DIR = Path(__file__).resolve().parents[2] / "deploy" / "models"


def default_model_path(kind: str) -> Path:
    """deploy/models/<kind>.yaml (the Criteo-layout specs shipped with the project)."""
    return MODEL_DIR / f"{kind}.yaml"


def load_model_spec(settings: TrainerSettings, kind: str | None) -> ModelSpec:
    if settings.model:
        path = Path(settings.model)
    elif kind:
        path = default_model_path(kind)
    else:
        raise PipelineError("give --model KIND (lr, wide_deep, deepfm) or --model-spec PATH")
    if not path.is_file():
        raise PipelineError(f"model spec {path} does not exist")
    return ModelSpec.from_yaml(path)


@dataclass
class TrainerRole:
    """Everything one trainer process runs, built from settings."""

    settings: TrainerSettings
    kafka: KafkaSettings
    redis: RedisSettings
    prefix: str
    spec: ModelSpec

    def run(
        self,
        *,
        max_rows: int | None = None,
        idle_exit_s: float | None = None,
        progress: TextIO | None = sys.stderr,
        stop: threading.Event | None = None,
        on_ready: Callable[[Trainer], None] | None = None,
        keep_predictions: bool = False,
        resume: Path | None = None,
    ) -> TrainResult:
        s = self.settings
        catalog = {t.name: t for t in load_catalog(Path(s.tables) if s.tables else None)}
        self.spec.check(catalog, SlotConfig(self.spec.slots, self.spec.dense_dim))
        trainer_id = s.trainer_id or f"{socket.gethostname()}-{os.getpid()}"
        client = connect(self.redis)
        ps = PSClient(
            client, trainer_id=trainer_id, max_inflight=s.max_inflight, ready_timeout_s=s.ps_wait_s
        )
        for table in self.spec.tables():
            ps.route(table)  # waits for the shard servers, then fails with a clear message
        group = f"{self.prefix}train.{s.job}"
        if resume is not None:
            from pipeline.snapshot.restore import resume_positions
            from pipeline.train.resume import seek_group

            seek_group(self.kafka, group, resume_positions(resume))
        producer = kafka_io.producer(self.kafka)
        dlq = DeadLetterWriter(producer, self.prefix + s.dlq_topic)
        metrics = WindowedMetrics(window_s=s.metrics_window_s)
        trainer_box: list[Trainer] = []

        def on_revoke(partitions: list[tuple[str, int]]) -> None:
            if trainer_box:
                trainer_box[0].request_drain()

        dataset = QueueDataset(
            self.kafka,
            self.prefix + s.samples_topic,
            group,
            SlotConfig(self.spec.slots, self.spec.dense_dim),
            s.batch_rows,
            dlq=dlq,
            on_revoke=on_revoke,
        )
        trainer = Trainer(
            self.spec,
            catalog,
            ps,
            s,
            trainer_id=trainer_id,
            device=pick_device(s.device),
            metrics=metrics,
            # queued, performed by the reader thread that owns the consumer (see dataset.py)
            commit=functools.partial(dataset.commit, wait=False),
            keep_predictions=keep_predictions,
        )
        trainer_box.append(trainer)
        # Redis lost the dense table: never re-initialize a model that exists
        trainer.dense.recover = DenseRecovery(ps, trainer, resume or s.snapshot_dir, s.ps_wait_s)
        from pipeline.snapshot.participant import SnapshotParticipant

        participant = SnapshotParticipant(client, s.job, trainer_id)
        # snapshots of this job cut at our barriers (Redis outages ridden out)
        trainer.participant = retrying(participant, ps.outage)
        if resume is not None:
            from pipeline.snapshot.layout import load_snapshot
            from pipeline.snapshot.restore import restore_trainer

            restore_trainer(trainer, load_snapshot(resume))
        sink = retrying(RedisMetricsSink(client, s.job), ps.outage)
        _resume_metrics(sink, trainer_id, metrics)
        # the step schedule's age: rows the whole job trained (a restarted or added
        # trainer of an established job starts with large steps)
        trainer.stream_age = lambda: int(sink.global_cumulative()[0].count)
        publisher = MetricsPublisher(producer, self.prefix + s.metrics_topic)
        exporter = PrometheusExporter(
            s.metrics_port, trainer_id, s.job, s.metrics_host, s.metrics_token_value()
        )
        if s.metrics_port is not None:
            exporter.start()
        started = time.monotonic()
        last_print = [0.0]
        last_sync = [0.0]

        def publish(window: Any) -> None:
            sink.publish(trainer_id, metrics.cumulative, window)
            labels = {"job": s.job, "model": self.spec.name}
            if window is not None:
                publisher.publish(
                    trainer_id,
                    window.counts,
                    window.window_start_ms,
                    window.window_end_ms,
                    "window",
                    labels,
                )
            now_ms = int(time.time() * 1000)
            publisher.publish(trainer_id, metrics.cumulative, 0, now_ms, "cumulative", labels)
            global_counts, _ = sink.global_cumulative()
            publisher.publish("global", global_counts, 0, now_ms, "global", labels)
            exporter.update(metrics.cumulative, "cumulative")
            exporter.update(global_counts, "global")
            if window is not None:
                exporter.update(window.counts, "window")

        def on_progress(t: Trainer) -> None:
            window = metrics.roll()
            extras: dict[str, float | str] = {
                "rows/s": t.result.rows / max(time.monotonic() - started, 1e-9),
                "hit": t.cache_hit_rate(),
                "limit": t.stages.limiting,
                "dlq": float(dataset.stats.dead_letters_total),
            }
            for name, value in extras.items():
                if isinstance(value, float):
                    exporter.set_extra(f"pipeline_train_{_metric_name(name)}", value, name)
            if window is not None:
                publish(window)
                last_sync[0] = time.monotonic()
            elif time.monotonic() - last_sync[0] >= 1.0:
                # the global view in Redis follows training within a second
                sink.publish(trainer_id, metrics.cumulative, None)
                last_sync[0] = time.monotonic()
            if progress is not None and time.monotonic() - last_print[0] >= 2.0:
                last_print[0] = time.monotonic()
                print(progress_line(metrics.cumulative.summary(), extras), file=progress)

        dataset.start()
        watcher = None
        if stop is not None:

            def watch() -> None:
                stop.wait()
                trainer.stop()

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
        if on_ready is not None:
            on_ready(trainer)
        try:
            result = trainer.run(
                dataset, max_rows=max_rows, idle_timeout_s=idle_exit_s, on_progress=on_progress
            )
            result.dead_letter_reasons = dict(dataset.stats.dead_letters)
            publish(metrics.roll(force=True))
            publisher.flush(10.0)
        finally:
            participant.leave()
            trainer.close()
            dataset.close()
            exporter.close()
            producer.flush(10.0)
        if progress is not None:
            print(
                progress_line(metrics.cumulative.summary(), {"trainer": trainer_id}), file=progress
            )
        return result


def _resume_metrics(sink: RedisMetricsSink, trainer_id: str, metrics: WindowedMetrics) -> None:
    """A restarted trainer (same id, same job) continues its cumulative counts.

    Publishing overwrites the trainer's entry, so starting from zero would drop
    everything it trained before the restart from ``pipeline metrics show``.
    """
    try:
        previous = sink.load(trainer_id)
    except PipelineError as exc:
        log.warning("starting new cumulative metrics: %s", exc)
        return
    if previous is None:
        return
    if previous.buckets != metrics.buckets:
        log.warning(
            "starting new cumulative metrics: the stored ones of %s use %d buckets, not %d",
            trainer_id,
            previous.buckets,
            metrics.buckets,
        )
        return
    metrics.cumulative.merge(previous)
    log.info("%s resumes its cumulative metrics at %d samples", trainer_id, int(previous.count))


def _metric_name(name: str) -> str:
    return {"rows/s": "rows_per_second", "hit": "cache_hit_rate", "dlq": "dead_letters"}.get(
        name, name
    )


def run_trainer(role: TrainerRole, **kwargs: Any) -> TrainResult:
    return role.run(**kwargs)
