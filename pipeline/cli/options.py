"""Options shared by several commands (state dir, Kafka, Redis)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

__all__ = ["bootstrap_option", "prefix_option", "redis_url_option", "state_dir_option"]

F = TypeVar("F", bound=Callable[..., Any])


def state_dir_option(func: F) -> F:
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False),
        default=None,
        help="Where the stack keeps PIDs and logs [env PIPELINE_STACK_STATE_DIR]",
    )(func)


def bootstrap_option(func: F) -> F:
    return click.option(
        "--bootstrap",
        default=None,
        metavar="HOST:PORT",
        help="An external Kafka instead of the embedded broker [env PIPELINE_KAFKA_BOOTSTRAP]",
    )(func)


def redis_url_option(func: F) -> F:
    return click.option(
        "--redis-url",
        default=None,
        metavar="URL",
        help="An external Redis instead of the embedded one [env PIPELINE_REDIS_URL]",
    )(func)


def prefix_option(func: F) -> F:
    return click.option(
        "--prefix",
        default=None,
        help="Prefix for every topic name [env PIPELINE_TOPICS_PREFIX]",
    )(func)
