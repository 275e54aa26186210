"""``pipeline join``: join impressions with clicks into labelled sample batches."""

from __future__ import annotations

import json
import signal
import threading
from dataclasses import asdict
from typing import Any

import click

from pipeline.cli.options import bootstrap_option, prefix_option
from pipeline.config import KafkaSettings, TopicsSettings, load
from pipeline.joiner.settings import JoinerSettings

__all__ = ["join"]


@click.command()
@bootstrap_option
@prefix_option
@click.option(
    "--engine",
    type=click.Choice(["confluent", "faust"]),
    default=None,
    help="confluent (checkpointing runner) or faust [env PIPELINE_JOINER_ENGINE; confluent]",
)
@click.option("--app-id", default=None, help="Group/app id [env PIPELINE_JOINER_APP_ID; joiner]")
@click.option("--slots", default=None, help="Comma list of slots [env PIPELINE_JOINER_SLOTS]")
@click.option("--window-ms", type=int, default=None, help="Attribution window [env ..._WINDOW_MS]")
@click.option("--lateness-ms", type=int, default=None, help="Allowed disorder [..._LATENESS_MS]")
@click.option("--idle-ms", type=int, default=None, help="Idle flush after [..._IDLE_MS]")
@click.option(
    "--negative-rate", type=float, default=None, help="Negative keep rate [..._NEGATIVE_RATE]"
)
@click.option(
    "--late-corrections/--no-late-corrections",
    default=None,
    help="Emit late clicks as correction positives [..._LATE_CORRECTIONS]",
)
@click.option(
    "--positives",
    type=click.Choice(["click", "close"]),
    default=None,
    help="Emit a positive at its click or when its window closes [..._POSITIVES; click]",
)
@click.option("--batch-size", type=int, default=None, help="Rows per batch [..._BATCH_SIZE]")
@click.option("--linger-ms", type=int, default=None, help="Batch linger [..._LINGER_MS]")
@click.option(
    "--checkpoint-interval-s",
    type=float,
    default=None,
    help="Seconds between checkpoints [..._CHECKPOINT_INTERVAL_S]",
)
@click.option(
    "--session-timeout-ms",
    type=int,
    default=None,
    help="Consumer-group session timeout [env PIPELINE_KAFKA_SESSION_TIMEOUT_MS]",
)
def join(
    bootstrap: str | None, prefix: str | None, session_timeout_ms: int | None, **options: Any
) -> None:
    """Join events.impressions with events.clicks into `samples` until SIGINT/SIGTERM.

    Prints the final counters as JSON. Settings not given as options come from
    PIPELINE_JOINER_* env vars (see docs/joiner.md).
    """
    settings = load(JoinerSettings, **options)
    kafka = load(KafkaSettings, bootstrap=bootstrap, session_timeout_ms=session_timeout_ms)
    topic_prefix = load(TopicsSettings, prefix=prefix).prefix
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    if settings.engine == "faust":
        from pipeline.joiner.app import run_faust

        counters = run_faust(settings, kafka, topic_prefix, stop)
    else:
        from pipeline.joiner.runner import JoinRunner

        counters = JoinRunner(settings, kafka, topic_prefix).run(stop)
    click.echo(json.dumps(asdict(counters), sort_keys=True))
