"""run_every: the loop of the publisher and the snapshot coordinator."""

from __future__ import annotations

import logging
import threading

import pytest

from pipeline.periodic import run_every

pytestmark = pytest.mark.unit


class Flaky(Exception):
    pass


def test_steps_until_stopped_logging_retried_errors(caplog: pytest.LogCaptureFixture) -> None:
    stop, seen, calls = threading.Event(), [], [0]

    def step() -> int:
        calls[0] += 1
        if calls[0] == 2:
            raise Flaky("second step failed")
        if calls[0] == 4:
            stop.set()
        return calls[0]

    with caplog.at_level(logging.ERROR, logger="t"):
        run_every(stop, 0.0, step, seen.append, Flaky, logging.getLogger("t"))
    assert seen == [1, 3, 4]
    assert [r.getMessage() for r in caplog.records] == ["second step failed"]


def test_other_errors_end_the_loop() -> None:
    def step() -> None:
        raise ValueError("bug")

    with pytest.raises(ValueError, match="bug"):
        run_every(threading.Event(), 0.0, step, None, Flaky, logging.getLogger("t"))
