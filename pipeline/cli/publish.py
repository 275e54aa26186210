"""``pipeline publish run|export`` and ``pipeline subscribe``: thin layers over pipeline.publish."""

from __future__ import annotations

import functools
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import click

from pipeline.cli.options import bootstrap_option, prefix_option, redis_url_option
from pipeline.codec import avro
from pipeline.config import KafkaSettings, RedisSettings, TopicsSettings, load
from pipeline.errors import PipelineError
from pipeline.model.spec import ModelSpec

__all__ = ["publish", "subscribe"]

TOPIC = "model.updates"
_model_option = click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(dir_okay=False, exists=True),
    help="Model spec YAML (deploy/models/*.yaml)",
)


def _topic(prefix: str | None) -> str:
    return load(TopicsSettings, prefix=prefix).prefix + TOPIC


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


@click.group()
def publish() -> None:
    """Publish model versions to model.updates, or export one as files."""


@publish.command("run")
@_model_option
@click.option("--interval", "interval_s", type=float, default=60.0, show_default=True)
@click.option("--base-every", type=int, default=10, show_default=True, help="A base every K")
@click.option("--max-chunk-bytes", type=int, default=8 << 20, show_default=True)
@click.option("--once", is_flag=True, help="Publish one version and exit")
@click.option(
    "--holder",
    envvar="PIPELINE_PUBLISH_HOLDER",
    default=None,
    help="Stable id of this publisher: restarted under the same id it takes its lock back at "
    "once instead of waiting for it to expire (2 min) [env PIPELINE_PUBLISH_HOLDER]",
)
@bootstrap_option
@redis_url_option
@prefix_option
def run(
    model_path: str,
    interval_s: float,
    base_every: int,
    max_chunk_bytes: int,
    once: bool,
    holder: str | None,
    bootstrap: str | None,
    redis_url: str | None,
    prefix: str | None,
) -> None:
    """Publish a version every INTERVAL seconds (one active publisher per model)."""
    from pipeline.kafka import producer
    from pipeline.ps.frontclient import connect
    from pipeline.publish.publisher import Publisher
    from pipeline.publish.subscriber import last_manifest

    model = ModelSpec.from_yaml(model_path)
    kafka = load(KafkaSettings, bootstrap=bootstrap)
    kafka_producer = producer(kafka)
    metrics_topic = load(TopicsSettings, prefix=prefix).prefix + "metrics"
    pub = Publisher(
        connect(load(RedisSettings, url=redis_url)),
        kafka_producer,
        _topic(prefix),
        model,
        base_every=base_every,
        max_chunk_bytes=max_chunk_bytes,
        holder=holder,
        # numbering continues from the topic when Redis lost the publisher's state
        last_manifest=functools.partial(last_manifest, kafka, _topic(prefix), model),
    )

    def report(v: Any) -> None:
        now_ms = int(time.time() * 1000)
        fresh = now_ms - v.max_event_time if v.max_event_time > 0 else None
        click.echo(
            f"version {v.version} {v.kind} parent={v.parent} rows={v.rows} "
            f"tombstones={v.tombstones} bytes={v.payload_bytes} in {v.seconds:.2f}s"
            + (f" freshness={fresh / 1000:.2f}s" if fresh is not None else "")
        )
        if fresh is not None:
            # freshness at publication: newest event time covered -> version published
            record = {
                "name": "publish_freshness_ms",
                "window_start_ms": v.max_event_time,
                "window_end_ms": now_ms,
                "trainer_id": "publisher",
                "labels": {"model": model.name, "version": str(v.version), "kind": v.kind},
                "value": float(fresh),
                "auc_buckets": None,
            }
            key = f"publish_freshness_ms|{model.name}".encode()
            kafka_producer.produce(metrics_topic, avro.encode("Metric", record), key=key)
            kafka_producer.poll(0)

    if once:
        try:
            report(pub.publish())
        finally:
            pub.release()
            kafka_producer.flush(10)
        return
    try:
        pub.run(_stop_on_signals(), interval_s, report)
    finally:
        kafka_producer.flush(10)


def _follow(model: ModelSpec, bootstrap: str | None, prefix: str | None, **kwargs: Any) -> Any:
    from pipeline.publish.subscriber import Subscriber

    return Subscriber.connect(
        load(KafkaSettings, bootstrap=bootstrap), _topic(prefix), model, **kwargs
    )


@publish.command("export")
@_model_option
@click.option("--version", "version", type=int, required=True, help="Version to export")
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True)
@bootstrap_option
@prefix_option
def export(
    model_path: str,
    version: int,
    out: str,
    timeout_s: float,
    bootstrap: str | None,
    prefix: str | None,
) -> None:
    """Rebuild VERSION from model.updates and write it as .npy files + manifest.json."""
    from pipeline.publish.export import export_version

    # an older version may precede the latest base: read the whole retained history
    sub = _follow(ModelSpec.from_yaml(model_path), bootstrap, prefix, from_latest_base=False)
    deadline = time.monotonic() + timeout_s
    try:
        while sub.live is None or sub.live.version < version:
            if time.monotonic() > deadline:
                raise PipelineError(f"version {version} did not arrive within {timeout_s:g} s")
            sub.poll(0.5)
    finally:
        sub.close()
    if sub.live.version != version:
        raise PipelineError(
            f"version {version} was not applied (now at {sub.live.version}); see the log"
        )
    click.echo(str(export_version(sub.live, Path(out))))


@click.command()
@_model_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per version")
@click.option(
    "--from-beginning",
    is_flag=True,
    help="Apply every retained version, not just the latest base and the deltas after it",
)
@bootstrap_option
@prefix_option
def subscribe(
    model_path: str,
    as_json: bool,
    from_beginning: bool,
    bootstrap: str | None,
    prefix: str | None,
) -> None:
    """Follow model.updates: apply versions and print each with its freshness.

    Starts at the latest base (the newest manifest's base_offset) unless
    --from-beginning.
    """

    def show(event: Any, live: Any) -> None:
        if as_json:
            click.echo(json.dumps(event.__dict__, default=str))
            return
        fresh = "n/a" if event.freshness_ms is None else f"{event.freshness_ms / 1000:.1f}s"
        click.echo(
            f"version {event.version} {event.kind} {event.status} freshness={fresh} "
            f"rows={event.rows} {event.reason}".rstrip()
        )

    sub = _follow(
        ModelSpec.from_yaml(model_path),
        bootstrap,
        prefix,
        on_version=show,
        from_latest_base=not from_beginning,
    )
    try:
        sub.run(_stop_on_signals())
    finally:
        sub.close()
