"""The demo's per-role resources and per-group lags, from /proc and from the timeline."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pipeline.demo.procs import Usage, group_usage
from pipeline.demo.report import Tick, Timeline, group_lags, resources

pytestmark = pytest.mark.unit


def test_group_usage_sums_a_process_group_and_reads_single_processes() -> None:
    # a child in its own session that allocates ~64 MB and forks a grandchild that
    # burns CPU: both count for the group
    code = (
        "import os, time; block = bytearray(64 << 20); block[::4096] = b'x' * len(block[::4096])\n"
        "if os.fork() == 0:\n"
        "    end = time.process_time() + 0.5\n"
        "    while time.process_time() < end: pass\n"
        "    time.sleep(30)\n"
        "time.sleep(30)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        usage: dict[str, Usage] = {}
        while time.monotonic() < deadline:
            usage = group_usage({"role": child.pid}, {"me": os.getpid()})
            if "role" in usage and usage["role"].rss_mb > 64 and usage["role"].cpu_s >= 0.4:
                break
            time.sleep(0.2)
        assert usage["role"].rss_mb > 64 and usage["role"].cpu_s >= 0.4, usage
        assert usage["me"].rss_mb > 10
        assert group_usage({"gone": 2**22 + 12345}) == {}
    finally:
        os.killpg(child.pid, 9)
        child.wait()


def _tick(t: float, lag: int | None, join_lag: int | None) -> Tick:
    return Tick(t, 0, 0, 0.0, None, None, None, lag, join_lag)


def test_resources_take_the_samples_at_the_span_ends_and_the_peak() -> None:
    timeline = Timeline()
    for t, rss, cpu in (
        (1.0, 100.0, 1.0),
        (5.0, 180.0, 3.0),
        (9.0, 150.0, 9.0),
        (13.0, 400.0, 12.0),
    ):
        timeline.add_usage(t, {"join": Usage(rss, cpu), "train0": Usage(rss * 2, cpu / 2)})
    got = resources(timeline, start_t=4.0, end_t=10.0)
    assert got["join"] == {
        "rss_start_mb": 180.0,
        "rss_end_mb": 150.0,
        "rss_peak_mb": 400.0,
        "cpu_cores": 1.5,  # (9 - 3) CPU s over 4 s
    }
    assert got["train0"]["cpu_cores"] == 0.75
    assert resources(timeline, start_t=20.0, end_t=30.0) == {}


def test_group_lags_at_the_end_of_the_data_and_their_max() -> None:
    timeline = Timeline()
    for t, lag, join in ((1, 5, None), (2, 40, 900), (3, 7, 300), (4, 0, 0)):
        timeline.add(_tick(float(t), lag, join))
    assert group_lags(timeline, end_t=3.0) == {
        "train": {"end": 7, "max": 40},
        "join": {"end": 300, "max": 900},
    }
