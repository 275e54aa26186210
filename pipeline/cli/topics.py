"""``pipeline topics apply|list``: declared topics against a cluster."""

from __future__ import annotations

import click

from pipeline.cli.options import bootstrap_option, prefix_option
from pipeline.config import KafkaSettings, TopicsSettings, load
from pipeline.topics import apply_topics, describe_topics, load_topic_specs

__all__ = ["topics"]


def _conf(bootstrap: str | None) -> dict[str, object]:
    return {**load(KafkaSettings, bootstrap=bootstrap).client_config(), "log_level": 0}


@click.group()
def topics() -> None:
    """Declared topics (topics/*.yaml): apply them, list them."""


@topics.command("apply")
@bootstrap_option
@prefix_option
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Folder of topic YAML files [env PIPELINE_TOPICS_DIR]",
)
@click.option("--check", is_flag=True, help="Exit 3 when any topic has drifted")
def apply_cmd(
    bootstrap: str | None, prefix: str | None, directory: str | None, check: bool
) -> None:
    """Create missing topics (idempotent) and report drift; never deletes data."""
    settings = load(TopicsSettings, prefix=prefix, dir=directory)
    specs = load_topic_specs(settings.dir)
    actions = apply_topics(_conf(bootstrap), specs, prefix=settings.prefix)
    for action in actions:
        click.echo(f"{action.topic}: {action.action}" + "".join(f"; {d}" for d in action.details))
    drifted = [a for a in actions if a.action == "drift"]
    if drifted:
        click.echo(
            f"{len(drifted)} topic(s) drifted from their declaration (left as they are)", err=True
        )
        if check:
            raise SystemExit(3)


@topics.command("list")
@bootstrap_option
@prefix_option
@click.option("--dir", "directory", type=click.Path(file_okay=False, exists=True), default=None)
def list_cmd(bootstrap: str | None, prefix: str | None, directory: str | None) -> None:
    """List declared topics with their state on the cluster."""
    settings = load(TopicsSettings, prefix=prefix, dir=directory)
    rows = describe_topics(_conf(bootstrap), load_topic_specs(settings.dir), prefix=settings.prefix)
    click.echo(f"{'topic':32} {'partitions':>10} {'declared':>8}  configs")
    for name, actual, spec in rows:
        shown = "missing" if actual is None else str(actual)
        configs = ", ".join(f"{k}={v}" for k, v in spec.configs.items())
        click.echo(f"{name:32} {shown:>10} {spec.partitions:>8}  {configs}")
