"""The demo's child processes: each role in its own session, all stopped as groups.

Every child is ``python -m pipeline.cli <role> ...`` started with
``start_new_session=True`` so it (and anything it forks) forms one process group
that ``killpg`` stops; a terminal Ctrl-C reaches only the demo, which then stops
the children in order. PIDs are recorded in ``<state>/demo-pids.json`` so a test
(or a person) can check that nothing is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProcessSet", "Usage", "group_usage"]


class ProcessSet:
    """Named role processes with their logs under ``log_dir``."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.env = {**os.environ, **(env or {})}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pid_file = log_dir / "demo-pids.json"

    def start(self, name: str, *args: str, threads: int = 1) -> subprocess.Popen[bytes]:
        """Start ``pipeline <args>`` as role ``name`` (log: ``<log_dir>/<name>.log``).

        ``threads`` is the role's thread budget (``pipeline --threads``): the roles share
        the box, so each gets its share instead of one thread per core.
        """
        cmd = [sys.executable, "-m", "pipeline.cli", "--log-level", "info"]
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [*cmd, "--threads", str(threads), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self.env,
            )
        self.procs[name] = proc
        self._record()
        return proc

    def _record(self) -> None:
        pids = {name: p.pid for name, p in self.procs.items()}
        self.pid_file.write_text(json.dumps(pids, indent=2))

    def usage(self, single: dict[str, int] | None = None) -> dict[str, Usage]:
        """RSS and CPU time of every running role's process group (plus ``single`` pids)."""
        running = {name: p.pid for name, p in self.procs.items() if p.poll() is None}
        return group_usage(running, single)

    def dead(self) -> list[str]:
        """Roles that exited although nobody asked them to."""
        return [name for name, p in self.procs.items() if p.poll() is not None]

    def log_tail(self, name: str, chars: int = 600) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:].strip() if path.exists() else ""

    def stop(self, names: list[str], timeout: float = 30.0) -> dict[str, int | None]:
        """SIGTERM the groups of ``names``, wait, SIGKILL what is left; returns exit codes."""
        chosen = [(n, self.procs[n]) for n in names if n in self.procs]
        for _, proc in chosen:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc in chosen:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        codes: dict[str, int | None] = {}
        for name, proc in chosen:
            # the group may hold grandchildren even after the leader exited
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            codes[name] = proc.returncode
        return codes

    def stop_all(self, timeout: float = 20.0) -> None:
        """Stop every role still running (the failure path)."""
        self.stop(list(self.procs), timeout)


@dataclass(frozen=True)
class Usage:
    """Resident memory and CPU time used so far by a process group (or one process)."""

    rss_mb: float
    cpu_s: float


def group_usage(groups: dict[str, int], single: dict[str, int] | None = None) -> dict[str, Usage]:
    """Usage of each named process group (by pgid; every role runs in its own session,
    so the group is the role and whatever it forked) and of each ``single`` process
    (by pid), from ``/proc/<pid>/stat``. Names whose processes are all gone are absent.
    Linux only; elsewhere the result is empty.
    """
    by_group = {pgid: name for name, pgid in groups.items()}
    by_pid = {pid: name for name, pid in (single or {}).items()}
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    rss: dict[str, int] = {}
    cpu: dict[str, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {}
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        # after "pid (comm) ": state ppid pgrp ... utime stime (fields 14, 15) ... rss (24)
        fields = stat[stat.rfind(b")") + 2 :].split()
        name = by_pid.get(int(entry)) or by_group.get(int(fields[2]))
        if name is None:
            continue
        rss[name] = rss.get(name, 0) + int(fields[21]) * page
        cpu[name] = cpu.get(name, 0) + int(fields[11]) + int(fields[12])
    return {n: Usage(round(rss[n] / 2**20, 1), cpu[n] / tick) for n in rss}
