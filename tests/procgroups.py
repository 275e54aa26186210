"""Processes a test starts, each in its own process group, all killed at teardown.

Every process is started with ``start_new_session=True``, so it and whatever it
forks form one group that ``killpg`` reaches. :meth:`ProcessGroups.close` (the
``processes`` fixture's teardown, pass or fail) sends SIGTERM to every group,
waits, then SIGKILLs what is left: a failing test never leaves a role running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["ProcessGroups"]


class ProcessGroups:
    """Owns the processes it starts; :meth:`close` ends all their groups."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def start(self, args: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen(args, **popen)`` in a new session (its own process group)."""
        popen["start_new_session"] = True
        popen.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen(list(args), **popen)
        self.procs.append(proc)
        return proc

    def pipeline(
        self,
        *args: str,
        log: Path | None = None,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[str]:
        """``python -m pipeline.cli --log-level info ARGS``; stderr to ``log`` (appended)."""
        err: Any = subprocess.DEVNULL if log is None else log.open("a")
        try:
            return self.start(
                [sys.executable, "-m", "pipeline.cli", "--log-level", "info", *args],
                stdout=stdout,
                stderr=err,
                text=True,
                env={**os.environ, **(env or {})},
            )
        finally:
            if log is not None:
                err.close()  # the child holds its own copy

    @staticmethod
    def signal(proc: subprocess.Popen[Any], sig: int) -> None:
        """Send ``sig`` to ``proc``'s whole group (nothing when it is gone)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def kill(self, proc: subprocess.Popen[Any]) -> int:
        """SIGKILL ``proc``'s group (a crash) and reap it; its exit code."""
        self.signal(proc, signal.SIGKILL)
        return proc.wait(30)

    def stop(self, *procs: subprocess.Popen[Any], timeout: float = 30.0) -> list[int | None]:
        """SIGTERM the groups of ``procs`` (default: all), wait up to ``timeout`` s in
        all, SIGKILL what is left (grandchildren included); their exit codes."""
        chosen = list(procs) or list(self.procs)
        for proc in chosen:
            if proc.poll() is None:
                self.signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in chosen:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for proc in chosen:
            self.signal(proc, signal.SIGKILL)  # the group may outlive its leader
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        return [proc.returncode for proc in chosen]

    def close(self, timeout: float = 20.0) -> None:
        """Stop every group, close the pipes; never raises for a process that is gone."""
        if not self.procs:
            return
        self.stop(*self.procs, timeout=timeout)
        for proc in self.procs:
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()

    def __enter__(self) -> ProcessGroups:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
