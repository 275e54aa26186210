"""The loop of a role that does one step every interval (publisher, snapshot coordinator)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from pipeline.retry import Outage

__all__ = ["run_every"]

T = TypeVar("T")


def run_every(
    stop: threading.Event,
    interval_s: float,
    step: Callable[[], T],
    on_result: Callable[[T], None] | None,
    retried: type[Exception],
    log: logging.Logger,
    outage: Outage | None = None,
) -> None:
    """Call ``step`` every ``interval_s`` (start to start) until ``stop`` is set.

    Each result goes to ``on_result``; a ``retried`` error is logged to ``log`` and the
    next step comes at the next interval; any other error ends the loop. With
    ``outage``, a Redis outage is ridden out: the step is tried again after a backoff
    delay (not the interval) until Redis is back.
    """
    from pipeline.retry import redis_errors

    away = redis_errors() if outage is not None else ()
    while not stop.is_set():
        started = time.monotonic()
        try:
            out = step()
            if outage is not None:
                outage.ok()
            if on_result is not None:
                on_result(out)
        except away as exc:
            assert outage is not None
            stop.wait(outage.failed(exc))
            continue
        except retried as exc:
            log.error("%s", exc)
        stop.wait(max(0.0, interval_s - (time.monotonic() - started)))
