"""``pipeline demo``: the whole pipeline as local processes, live progress, a report."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.demo import DemoError, DemoSettings, run_demo

__all__ = ["demo"]


@click.command()
@click.option(
    "--duration",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds of data before the clean stop",
)
@click.option(
    "--rate",
    type=float,
    default=10000.0,
    show_default=True,
    help="Impressions (or sample rows) per second produced",
)
@click.option(
    "--source",
    type=click.Choice(["events", "samples"]),
    default=None,
    help="Synthetic data as impressions + clicks joined by `pipeline join`, or as labelled "
    "sample batches straight to the trainers [events]",
)
@click.option(
    "--window",
    "window_s",
    type=float,
    default=None,
    help="Attribution window of the joiner in seconds (events source) [5]",
)
@click.option("--shards", type=int, default=2, show_default=True, help="Shard servers")
@click.option("--trainers", type=int, default=2, show_default=True, help="Trainer processes")
@click.option(
    "--model",
    "model_kind",
    type=click.Choice(["lr", "wide_deep", "deepfm"]),
    default="deepfm",
    show_default=True,
)
@click.option(
    "--dataset",
    type=click.Path(path_type=Path),
    default=None,
    help="Replay this dataset (paced at --rate, event times restamped) instead of the generator",
)
@click.option(
    "--format",
    "dataset_format",
    default=None,
    help="Dataset format: criteo, avazu, movielens [detected]",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=Path(".demo"),
    show_default=True,
    help="Logs, specs, snapshots and the report go here",
)
@click.option(
    "--bootstrap",
    default=None,
    metavar="HOST:PORT",
    help="Use this Kafka instead of starting the embedded broker",
)
@click.option(
    "--redis-url",
    default=None,
    metavar="URL",
    help="Use this Redis instead of starting redis-server",
)
@click.option("--broker-port", type=int, default=None, help="Embedded broker port [free]")
@click.option("--redis-port", type=int, default=None, help="Embedded redis port [free]")
@click.option("--serve-port", type=int, default=None, help="Serving HTTP port [free]")
@click.option("--publish-interval", type=float, default=2.0, show_default=True)
@click.option("--snapshot-interval", type=float, default=30.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Generator seed")
def demo(
    duration: float,
    rate: float,
    shards: int,
    trainers: int,
    model_kind: str,
    source: str | None,
    window_s: float | None,
    dataset: Path | None,
    dataset_format: str | None,
    state_dir: Path,
    bootstrap: str | None,
    redis_url: str | None,
    broker_port: int | None,
    redis_port: int | None,
    serve_port: int | None,
    publish_interval: float,
    snapshot_interval: float,
    seed: int,
) -> None:
    """Run broker, Redis, joiner, shard servers, trainers, snapshots, publisher and serving.

    Prints progress every 2 s, stops cleanly at --duration or on Ctrl-C, then prints a
    summary and writes <state-dir>/report (report.json, auc/throughput/freshness/lag PNGs).
    See docs/demo.md.
    """
    if dataset is not None and (source is not None or window_s is not None):
        raise DemoError(
            "--source and --window choose the synthetic data; a --dataset is replayed as "
            "labelled samples (no joiner): leave them out"
        )
    if source == "samples" and window_s is not None:
        raise DemoError("--window is the joiner's attribution window: it needs --source events")
    settings = DemoSettings(
        state_dir=state_dir,
        duration_s=duration,
        rate=rate,
        shards=shards,
        trainers=trainers,
        model_kind=model_kind,
        source=source or "events",
        window_s=5.0 if window_s is None else window_s,
        dataset=dataset,
        dataset_format=dataset_format,
        bootstrap=bootstrap,
        redis_url=redis_url,
        broker_port=broker_port,
        redis_port=redis_port,
        serve_port=serve_port,
        publish_interval_s=publish_interval,
        snapshot_interval_s=snapshot_interval,
        seed=seed,
    )
    run_demo(settings, echo=click.echo)
