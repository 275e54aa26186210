"""``pipeline up/status/down`` as a user runs them: real subprocesses, real binaries."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.stack import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.usefixtures("stack_binaries"),
]


def _pipeline(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def _ports_args(state: Path) -> tuple[list[str], int, int]:
    broker, redis_port = free_port(), free_port()
    return (
        ["--state-dir", str(state), "--broker-port", str(broker), "--redis-port", str(redis_port)],
        broker,
        redis_port,
    )


def _pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline:  # empty cmdline: a zombie awaiting reaping, not running
            alive.append(pid)
    return alive


def test_up_status_topics_down(tmp_path: Path) -> None:
    args, broker, _ = _ports_args(tmp_path / "state")
    up = _pipeline("up", *args)
    assert up.returncode == 0, up.stderr
    assert up.stdout.count(": created") == 6
    import json

    pids = [
        svc["pid"]
        for svc in json.loads((tmp_path / "state" / "stack.json").read_text())["services"].values()
    ]
    try:
        status = _pipeline("status", "--state-dir", str(tmp_path / "state"))
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("answering") == 2
        listed = _pipeline("topics", "list", "--bootstrap", f"127.0.0.1:{broker}")
        assert listed.returncode == 0 and "missing" not in listed.stdout
        again = _pipeline("up", *args)
        assert again.returncode == 1 and "already up" in again.stderr
    finally:
        down = _pipeline("down", "--state-dir", str(tmp_path / "state"))
    assert down.returncode == 0 and "stopped" in down.stdout
    time.sleep(0.2)
    assert _pids_alive(pids) == []
    assert not (tmp_path / "state" / "stack.json").exists()


def test_busy_port_is_a_clear_error_and_nothing_is_left(tmp_path: Path) -> None:
    args, _, redis_port = _ports_args(tmp_path / "state")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", redis_port))
        busy.listen()
        result = _pipeline("up", *args)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: redis port 127.0.0.1:{redis_port} is in use "
        "(another stack? run `pipeline status`, or pass --redis-port)"
    ]
    assert not (tmp_path / "state" / "stack.json").exists()
    with socket.socket() as probe:  # the broker started before the failure is stopped again
        assert probe.connect_ex(("127.0.0.1", int(args[3]))) != 0


def test_missing_redis_binary_names_the_piece(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    python_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": python_dir}  # no redis-server on this PATH
    assert shutil.which("redis-server", path=python_dir) is None
    args, broker, _ = _ports_args(tmp_path / "state")
    result = _pipeline("up", *args, env=env)
    assert result.returncode == 1
    assert "redis-server not found on PATH" in result.stderr and "apt-get install" in result.stderr
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", broker)) != 0, "broker left running"


def test_unwritable_state_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    result = _pipeline("up", "--state-dir", str(blocker / "state"))
    assert result.returncode == 1
    assert "not writable" in result.stderr
