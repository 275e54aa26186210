"""tests/procgroups.py: every process a test starts dies with its whole group at teardown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procgroups import ProcessGroups

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as dead
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_close_kills_every_group_and_the_children_left_in_it() -> None:
    owned = ProcessGroups()
    # a leader that ignores SIGTERM and a grandchild that outlives its parent
    stubborn = owned.start(
        ["sh", "-c", "trap '' TERM; sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True
    )
    orphaner = owned.start(["sh", "-c", "sleep 300 & echo $!"], stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout is not None and orphaner.stdout is not None
    children = [int(stubborn.stdout.readline()), int(orphaner.stdout.readline())]
    orphaner.wait(10)  # its sleep is left in its group, not reaped by anyone we own
    assert os.getpgid(stubborn.pid) == stubborn.pid != os.getpgid(0)  # own session
    owned.close(timeout=1.0)
    assert stubborn.returncode == -signal.SIGKILL  # SIGTERM ignored, then killed
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children):
        assert time.monotonic() < deadline, "a grandchild outlived its process group"
        time.sleep(0.05)


def test_the_fixture_kills_what_a_failing_test_left(tmp_path: Path) -> None:
    test = tmp_path / "test_leaves_a_process.py"
    test.write_text(
        "from tests.conftest import processes  # noqa: F401\n"
        "def test_fails(processes):\n"
        "    proc = processes.start(['sleep', '300'])\n"
        f"    open({str(tmp_path / 'pid')!r}, 'w').write(str(proc.pid))\n"
        "    assert False, 'the test failed with its process running'\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", str(test), "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "1 failed" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
