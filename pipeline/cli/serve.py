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
@click.option(
    "--host",
    default=None,
    help="Address to listen on [env PIPELINE_SERVE_HOST; default 127.0.0.1; 0.0.0.0: every "
    "interface, e.g. in a container]",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="[env PIPELINE_SERVE_PORT; default 8080]",
)
@click.option("--max-rows", type=click.IntRange(1), default=10_000, show_default=True)
@bootstrap_option
@prefix_option
def serve(
    model_path: str,
    host: str | None,
    port: int | None,
    max_rows: int,
    bootstrap: str | None,
    prefix: str | None,
) -> None:
    """Serve POST /predict, GET /health and GET /metrics from the live model version.

    With PIPELINE_SERVE_TOKEN (or _TOKEN_FILE) set, /predict and /metrics need
    ``Authorization: Bearer <token>``; /health stays open.
    """
    from pipeline.publish.serve import Server
    from pipeline.publish.settings import ServeSettings
    from pipeline.publish.subscriber import Subscriber

    settings = load(ServeSettings, host=host, port=port)
    token = settings.token_value()
    model = ModelSpec.from_yaml(model_path)
    topic = load(TopicsSettings, prefix=prefix).prefix + TOPIC
    sub = Subscriber.connect(load(KafkaSettings, bootstrap=bootstrap), topic, model)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = Server(sub, settings.host, settings.port, max_rows=max_rows, token=token).start()
    auth = "bearer token required" if token else "no authentication"
    click.echo(f"serving model {model.name!r} from {topic} on {server.url} ({auth})", err=True)
    try:
        stop.wait()
    finally:
        server.stop()
        sub.close()
