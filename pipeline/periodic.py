"""The loop of a role that does one step every interval (publisher, snapshot coordinator)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["run_every"]

T = TypeVar("T")


def run_every(
    stop: threading.Event,
    interval_s: float,
    step: Callable[[], T],
    on_result: Callable[[T], None] | None,
    retried: type[Exception],
    log: logging.Logger,
) -> None:
    """Call ``step`` every ``interval_s`` (start to start) until ``stop`` is set.

    Each result goes to ``on_result``; a ``retried`` error is logged to ``log`` and the
    next step comes at the next interval; any other error ends the loop.
    """
    while not stop.is_set():
        started = time.monotonic()
        try:
            out = step()
            if on_result is not None:
                on_result(out)
        except retried as exc:
            log.error("%s", exc)
        stop.wait(max(0.0, interval_s - (time.monotonic() - started)))
