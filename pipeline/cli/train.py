"""``pipeline train``: one trainer of a consumer group, until SIGTERM/SIGINT (or a bound)."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click
import numpy as np

from pipeline.cli.options import bootstrap_option, prefix_option, redis_url_option
from pipeline.config import KafkaSettings, RedisSettings, TopicsSettings, load
from pipeline.train.runner import TrainerRole, load_model_spec
from pipeline.train.settings import TrainerSettings

__all__ = ["train"]

log = logging.getLogger(__name__)


@click.command()
@click.option(
    "--model",
    "kind",
    type=click.Choice(["lr", "wide_deep", "deepfm"]),
    default=None,
    help="Model kind (its spec is deploy/models/<kind>.yaml)",
)
@click.option(
    "--config",
    "model",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Model spec YAML instead of a kind [env PIPELINE_TRAIN_MODEL]",
)
@click.option("--job", default=None, help="Job name [env PIPELINE_TRAIN_JOB]")
@click.option("--trainer-id", default=None, help="Trainer id [env PIPELINE_TRAIN_TRAINER_ID]")
@click.option(
    "--mode", type=click.Choice(["async", "geo", "sync"]), default=None, help="Update mode"
)
@click.option(
    "--batch-rows",
    type=int,
    default=None,
    help="Samples per step once the stream is established (async mode grows to it)",
)
@click.option(
    "--young-batch-rows",
    type=int,
    default=None,
    help="Async mode: samples per step while the stream is young (= --batch-rows: fixed steps)",
)
@click.option("--pass-batches", type=int, default=None, help="Batches per device-cache pass")
@click.option("--cache-rows", type=int, default=None, help="Device cache rows per table")
@click.option("--device", default=None, help="auto, cpu or cuda")
@click.option("--tables", default=None, help="Table catalog YAML")
@click.option("--metrics-port", type=int, default=None, help="Prometheus port (0 = any)")
@click.option(
    "--metrics-host",
    default=None,
    help="Address of the Prometheus exporter [env PIPELINE_TRAIN_METRICS_HOST; default "
    "127.0.0.1; 0.0.0.0 for a scraper elsewhere]",
)
@click.option("--max-rows", type=int, default=None, help="Stop after this many samples")
@click.option(
    "--idle-exit", type=float, default=None, help="Stop when no sample arrived for this long (s)"
)
@click.option("--json", "as_json", is_flag=True, help="Print the final result as JSON")
@click.option(
    "--resume",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Start the group at a snapshot's offsets (pipeline snapshot; group must be stopped)",
)
@click.option(
    "--predictions-out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write every progressive prediction and label to this .npz (audits, tests)",
)
@bootstrap_option
@prefix_option
@redis_url_option
def train(
    kind: str | None,
    bootstrap: str | None,
    prefix: str | None,
    redis_url: str | None,
    max_rows: int | None,
    idle_exit: float | None,
    as_json: bool,
    predictions_out: str | None,
    resume: str | None,
    **options: Any,
) -> None:
    """Train a model on the samples topic against the parameter server.

    Progressive validation: every batch is scored before it is trained on; a
    progress line is printed every few seconds and metrics go to Redis (global
    view), the metrics topic and, with --metrics-port, Prometheus.
    """
    settings = load(TrainerSettings, **options)
    role = TrainerRole(
        settings=settings,
        kafka=load(KafkaSettings, bootstrap=bootstrap),
        redis=load(RedisSettings, url=redis_url),
        prefix=load(TopicsSettings, prefix=prefix).prefix,
        spec=load_model_spec(settings, kind),
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    result = role.run(
        max_rows=max_rows,
        idle_exit_s=idle_exit,
        stop=stop,
        keep_predictions=predictions_out is not None,
        resume=Path(resume) if resume else None,
    )
    if predictions_out is not None:
        empty = np.zeros(0, np.float32)
        np.savez(
            predictions_out,
            predictions=np.concatenate(result.predictions) if result.predictions else empty,
            labels=np.concatenate(result.labels) if result.labels else empty,
        )
    summary = {
        "rows": result.rows,
        "batches": result.batches,
        "passes": result.passes,
        "dead_letters": result.dead_letters,
        "dead_letter_reasons": dict(sorted(result.dead_letter_reasons.items())),
        "seconds": round(result.seconds, 3),
        "rows_per_s": round(result.rows_per_s, 1),
        "first_row_at": result.first_row_at,
        "last_row_at": result.last_row_at,
        "pulled_keys": result.pulled_keys,
        "pushed_keys": result.pushed_keys,
        "batch_lookups": result.batch_lookups,
        "committed": {f"{t}:{p}": o for (t, p), o in sorted(result.committed.items())},
    }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        skip = ("committed", "dead_letter_reasons")
        click.echo(" ".join(f"{k}={v}" for k, v in summary.items() if k not in skip))
    sys.stdout.flush()
    if result.rows == 0 and result.dead_letter_reasons:
        _fail_all_dead(result.dead_letter_reasons)


def _fail_all_dead(reasons: dict[str, int]) -> None:
    """Exit 1: a trainer that only dead-lettered is fed the wrong data (layout, labels)."""
    counts = ", ".join(f"{r}={n}" for r, n in sorted(reasons.items()))
    click.echo(
        f"error: every message read was dead-lettered ({counts}); nothing was trained. "
        "See pipeline dlq inspect",
        err=True,
    )
    raise SystemExit(1)
