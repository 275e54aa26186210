"""Helpers of the multi-process end-to-end tests (roles run as `pipeline` processes)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.ingest.generator import SLOTS
from pipeline.ps.catalog import load_catalog

__all__ = ["finish", "role", "stop_all", "wait_for", "write_specs"]


def write_specs(
    tmp: Path, unique: str, serving: Mapping[str, Any] | None = None
) -> tuple[Path, Path]:
    """The default catalog under unique table names and a DeepFM over the generator's slots.

    ``serving`` replaces every table's serving spec (e.g. float32, unfiltered).
    """
    tables = []
    for spec in load_catalog():
        data = spec.to_dict()
        data["name"] = f"{unique}_{spec.name}"
        if serving is not None:
            data["serving"] = dict(serving)
        tables.append(data)
    catalog = tmp / "tables.yaml"
    catalog.write_text(yaml.safe_dump({"tables": tables}))
    model = tmp / "model.yaml"
    model.write_text(
        yaml.safe_dump(
            {
                "name": f"m{unique}",
                "kind": "deepfm",
                "slots": list(SLOTS),
                "dense_dim": 0,
                "wide_table": f"{unique}_wide",
                "deep_table": f"{unique}_deep",
                "deep_dim": 16,
                "hidden": [32, 16],
            }
        )
    )
    return catalog, model


def wait_for(
    what: str,
    done: Callable[[], Any],
    timeout: float,
    procs: Sequence[subprocess.Popen[str]],
) -> None:
    """Poll ``done`` until true; fail when a process exits early or time runs out."""
    deadline = time.monotonic() + timeout
    while not done():
        for p in procs:
            assert p.poll() is None, f"{p.args!r} exited early while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def role(*args: str, log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """``pipeline ARGS`` in its own session (process group); stdout to ``log``.out,
    stderr to ``log``. ``env`` is added to this process's environment."""
    with log.with_suffix(".out").open("w") as out, log.open("w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "--log-level", "info", *args],
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,
            env={**os.environ, "PIPELINE_KAFKA_SESSION_TIMEOUT_MS": "6000", **(env or {})},
        )


def finish(proc: subprocess.Popen[str], log: Path, timeout: float = 60) -> str:
    """Wait for a process that exits by itself; its stdout, or fail with its log."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == 0, f"{proc.args!r} -> {proc.returncode}\n{log.read_text()[-3000:]}"
    return log.with_suffix(".out").read_text()


def stop_all(procs: Sequence[subprocess.Popen[str]], grace: float = 20) -> None:
    """SIGTERM every process group, SIGKILL what outlives ``grace`` (also the groups of
    leaders that already exited: a child they left behind dies with its group)."""

    def signal_group(p: subprocess.Popen[str], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # the whole group is gone
            os.killpg(p.pid, sig)

    for p in procs:
        signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.1, deadline - time.monotonic()))
        signal_group(p, signal.SIGKILL)
        p.wait(10)
