"""``pipeline serve``: HTTP predictions from the model version live on model.updates."""

from __future__ import annotations

import signal
import threading

import click

from pipeline.cli.options import bootstrap_option, prefix_option
from pipeline.config import KafkaSettings, TopicsSettings, load
from pipeline.model.spec import ModelSpec

__all__ = ["serve"]

TOPIC = "model.updates"


@click.command()
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(dir_okay=False, exists=True),
    help="Model spec YAML (deploy/models/*.yaml)",
)
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--max-rows", type=click.IntRange(1), default=10_000, show_default=True)
@bootstrap_option
@prefix_option
def serve(
    model_path: str,
    host: str,
    port: int,
    max_rows: int,
    bootstrap: str | None,
    prefix: str | None,
) -> None:
    """Serve POST /predict, GET /health and GET /metrics from the live model version."""
    from pipeline.publish.serve import Server
    from pipeline.publish.subscriber import Subscriber

    model = ModelSpec.from_yaml(model_path)
    topic = load(TopicsSettings, prefix=prefix).prefix + TOPIC
    sub = Subscriber.connect(load(KafkaSettings, bootstrap=bootstrap), topic, model)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = Server(sub, host, port, max_rows=max_rows).start()
    click.echo(f"serving model {model.name!r} from {topic} on {server.url}", err=True)
    try:
        stop.wait()
    finally:
        server.stop()
        sub.close()
