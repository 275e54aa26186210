"""``pipeline up`` / ``down`` / ``status``: the embedded local stack."""

from __future__ import annotations

import time
from typing import Any

import click

from pipeline.cli.options import prefix_option, state_dir_option
from pipeline.config import KafkaSettings, StackSettings, TopicsSettings, load
from pipeline.redact import mask_url
from pipeline.stack import EmbeddedStack
from pipeline.topics import apply_topics, load_topic_specs

__all__ = ["down", "status", "up"]


def _stack(state_dir: str | None, **overrides: object) -> EmbeddedStack:
    return EmbeddedStack(load(StackSettings, state_dir=state_dir, **overrides))


@click.command()
@state_dir_option
@click.option(
    "--broker-port", type=int, default=None, help="[env PIPELINE_STACK_BROKER_PORT; 19092]"
)
@click.option("--redis-port", type=int, default=None, help="[env PIPELINE_STACK_REDIS_PORT; 16379]")
@click.option(
    "--bootstrap",
    default=None,
    metavar="HOST:PORT",
    help="Use an external Kafka instead of starting the broker [env PIPELINE_STACK_BOOTSTRAP]",
)
@click.option(
    "--redis-url",
    default=None,
    metavar="URL",
    help="Use an external Redis instead of redis-server [env PIPELINE_STACK_REDIS_URL]",
)
@click.option(
    "--topics/--no-topics",
    "with_topics",
    default=True,
    show_default=True,
    help="Apply topics/*.yaml once the broker answers",
)
@prefix_option
def up(
    state_dir: str | None,
    broker_port: int | None,
    redis_port: int | None,
    bootstrap: str | None,
    redis_url: str | None,
    with_topics: bool,
    prefix: str | None,
) -> None:
    """Start a Kafka-protocol broker and Redis in the background, then apply the topics."""
    stack = _stack(
        state_dir,
        broker_port=broker_port,
        redis_port=redis_port,
        bootstrap=bootstrap,
        redis_url=redis_url,
    )
    started_at = time.monotonic()
    services = stack.up()
    try:
        actions = []
        if with_topics:
            topics = load(TopicsSettings, prefix=prefix)
            kafka = services["kafka"]
            conf: dict[str, Any] = {"bootstrap.servers": kafka.address, "log_level": 0}
            if kafka.pid is None:  # an external broker: the roles' security settings
                conf = {**load(KafkaSettings, bootstrap=kafka.address).client_config(), **conf}
            actions = apply_topics(
                conf,
                load_topic_specs(topics.dir),
                prefix=topics.prefix,
            )
    except BaseException:
        stack.down()
        raise
    for svc in services.values():
        origin = f"pid {svc.pid}" if svc.pid else "external"
        click.echo(f"{svc.name:6} {mask_url(svc.address)}  ({origin})")
    for action in actions:
        click.echo(
            f"topic  {action.topic}: {action.action}" + "".join(f"; {d}" for d in action.details)
        )
    click.echo(f"up in {time.monotonic() - started_at:.1f} s; state in {stack.state_dir}")
    click.echo(f"export PIPELINE_KAFKA_BOOTSTRAP={services['kafka'].address}")
    click.echo(f"export PIPELINE_REDIS_URL={mask_url(services['redis'].address)}")


@click.command()
@state_dir_option
def down(state_dir: str | None) -> None:
    """Stop exactly the processes `pipeline up` started."""
    stopped = _stack(state_dir).down()
    click.echo("stopped " + ", ".join(stopped) if stopped else "nothing was running")


@click.command()
@state_dir_option
def status(state_dir: str | None) -> None:
    """Show the services of the local stack and whether they answer."""
    rows = _stack(state_dir).status()
    if not rows:
        click.echo("no stack is up (run `pipeline up`)")
        return
    for row in rows:
        state = "answering" if row["answering"] else ("running" if row["running"] else "DEAD")
        pid = row["pid"] if row["pid"] else "external"
        click.echo(f"{row['name']:6} {mask_url(row['address']):28} pid={pid!s:8} {state}")
    if not all(row["answering"] for row in rows):
        raise SystemExit(1)
