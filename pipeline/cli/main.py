"""Entry point: the ``pipeline`` click group and uniform error handling.

Every subcommand is a thin layer over a library call. A
:class:`~pipeline.errors.PipelineError` becomes ``error: <message>`` on stderr
and exit code 1, and so does a Redis or Kafka connection or authentication
failure (:mod:`pipeline.cli.failures`); usage errors exit 2 (click's convention).
"""

from __future__ import annotations

import logging
import sys

import click

from pipeline import __version__
from pipeline import threads as thread_budget
from pipeline.cli.failures import describe
from pipeline.errors import PipelineError
from pipeline.redact import mask_urls_in

__all__ = ["cli", "main"]


log = logging.getLogger(__name__)


class _Group(click.Group):
    """A group that turns PipelineError, and Redis or Kafka failures the user can fix,
    into one clear line and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            click.echo(f"error: {mask_urls_in(str(exc))}", err=True)
            ctx.exit(1)
        except Exception as exc:
            message = describe(exc)
            if message is None:
                raise
            log.debug("%s", message, exc_info=True)  # the traceback, at --log-level DEBUG
            click.echo(f"error: {message}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pipeline")
@click.option(
    "--log-level",
    default="WARNING",
    show_default=True,
    envvar="PIPELINE_LOG_LEVEL",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    envvar=thread_budget.THREADS_ENV,
    help="Cores this process may use for math (torch, OpenMP, BLAS) "
    f"[env {thread_budget.THREADS_ENV}; default: the CPUs available to it]",
)
def cli(log_level: str, threads: int | None) -> None:
    """Streaming online learning of sparse CTR models on Kafka."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    _apply_budget(threads)


def _apply_budget(given: int | None) -> None:
    """The thread budget for this process (the entry point already set the environment)."""
    budget = thread_budget.resolve(given)
    thread_budget.apply_env(budget)  # inherited by the processes this one starts
    thread_budget.apply_torch(budget)


def _register() -> None:
    from pipeline.cli import (
        config,
        demo,
        dlq,
        infer,
        join,
        metrics,
        produce,
        ps,
        publish,
        replay,
        serve,
        smoke,
        snapshot,
        stack,
        topics,
        train,
    )

    cli.add_command(stack.up)
    cli.add_command(stack.down)
    cli.add_command(stack.status)
    cli.add_command(topics.topics)
    cli.add_command(config.config)
    cli.add_command(smoke.smoke)
    cli.add_command(ps.ps)
    cli.add_command(produce.produce)
    cli.add_command(dlq.dlq)
    cli.add_command(replay.replay)
    cli.add_command(join.join)
    cli.add_command(train.train)
    cli.add_command(infer.infer)
    cli.add_command(metrics.metrics)
    cli.add_command(publish.publish)
    cli.add_command(publish.subscribe)
    cli.add_command(serve.serve)
    cli.add_command(demo.demo)
    cli.add_command(snapshot.snapshot)


_register()


def main() -> None:
    """Console-script entry point."""
    sys.exit(cli.main(prog_name="pipeline", standalone_mode=True))
