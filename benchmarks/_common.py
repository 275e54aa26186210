"""Helpers shared by benchmark scripts: private redis-server / stack, RSS, table printing."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A throwaway redis-server on a free port (no persistence); yields its URL."""
    from pipeline.stack import private_redis as spawn

    with tempfile.TemporaryDirectory() as tmp, spawn(Path(tmp)) as url:
        yield url


@contextlib.contextmanager
def private_stack(prefix: str = "bench-", keep: bool = False) -> Iterator[tuple[Any, Path]]:
    """The embedded broker + redis-server on free ports in a temporary dir.

    Yields the running ``EmbeddedStack`` and the dir (for specs, logs and scratch
    files). The stack is stopped on exit; the dir is removed unless ``keep`` (for
    logs an error message points to).
    """
    from pipeline.config import StackSettings
    from pipeline.stack import EmbeddedStack, free_port

    work = Path(tempfile.mkdtemp(prefix=prefix))
    stack = EmbeddedStack(
        StackSettings(
            state_dir=work / "stack",
            broker_port=free_port(),
            redis_port=free_port(),
            start_timeout_s=30,
        )
    )
    try:
        stack.up()
        try:
            yield stack, work
        finally:
            stack.down()
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def rss_mb() -> float:
    """Resident memory of this process in MB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain aligned table (no dependency beyond the standard library)."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print(
            "  "
            + "  ".join(
                c.rjust(w) if j else c.ljust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=False))
            )
        )
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
