"""The thread budget of a process: how many cores its math libraries may use.

Every role is one process, and several roles often share a box (``pipeline demo``,
a compose host, a node). Left alone, torch, OpenMP and BLAS each start one worker
per core in every process, and OpenMP workers spin while they wait: two trainers
on two cores then ran at 0.09x one trainer (docs/operations.md, "Thread budget").
So each process takes an explicit budget, from ``--threads`` or ``PIPELINE_THREADS``,
else the CPUs it may run on (affinity and the cgroup CPU quota of its container).

:func:`apply_env` must run before numpy or torch are imported: the OpenMP and BLAS
runtimes read their settings once, when they load. :func:`apply_torch` then sets
torch's own pools (it is safe to call again; torch ignores a second inter-op size).
Workers never busy-wait: ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import MutableMapping, Sequence
from pathlib import Path

__all__ = [
    "THREADS_ENV",
    "apply_env",
    "apply_torch",
    "available_cpus",
    "budget_from_argv",
    "resolve",
    "share",
]

THREADS_ENV = "PIPELINE_THREADS"

#: Options of the ``pipeline`` group (besides ``--threads``) that take a value.
_GROUP_VALUE_OPTIONS = frozenset({"--log-level"})

#: Thread-count variables of the runtimes torch and numpy may load.
_POOL_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup v2 (``cpu.max``) or v1 (``cfs_quota``) quota, if any."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota_us > 0 and period_us > 0:
            return quota_us / period_us
    except (OSError, ValueError):
        pass
    return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a container CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def resolve(threads: int | None = None) -> int:
    """The budget: ``threads`` if given, else ``PIPELINE_THREADS``, else :func:`available_cpus`.

    Raises :class:`~pipeline.errors.ConfigError` naming the setting when it is not a
    whole number >= 1.
    """
    from pipeline.config import ProcessSettings, load

    chosen = load(ProcessSettings, threads=threads).threads
    return chosen if chosen is not None else available_cpus()


def apply_env(threads: int, env: MutableMapping[str, str] | None = None) -> None:
    """Size the OpenMP/BLAS pools to ``threads`` and make their workers sleep, not spin.

    Sets ``PIPELINE_THREADS`` too, so child processes inherit the budget unless told
    otherwise. Explicit ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` settings are kept.
    """
    env = os.environ if env is None else env
    env[THREADS_ENV] = str(threads)
    for var in _POOL_VARS:
        env[var] = str(threads)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("GOMP_SPINCOUNT", "0")


def apply_torch(threads: int) -> None:
    """torch's intra-op pool to ``threads`` and its inter-op pool to one thread.

    The roles run one model step at a time per process, so an inter-op pool only adds
    idle threads; torch accepts the inter-op size once, before any parallel work.
    """
    import torch

    torch.set_num_threads(threads)
    # RuntimeError: already set, or parallel work already ran
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


def budget_from_argv(argv: Sequence[str]) -> int | None:
    """The value of a ``--threads N`` / ``--threads=N`` option before the subcommand."""
    args = iter(argv)
    for arg in args:
        if not arg.startswith("-"):
            return None  # the subcommand: options after it are not ours
        if arg in _GROUP_VALUE_OPTIONS:
            next(args, None)
            continue
        if arg == "--threads":
            value = next(args, "")
        elif arg.startswith("--threads="):
            value = arg.split("=", 1)[1]
        else:
            continue
        try:
            return int(value)
        except ValueError:
            return None  # click reports the bad value with its usage message
    return None


def share(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split ``total`` cores over roles by weight, at least one thread each.

    Used by ``pipeline demo`` to give each of its processes a budget; the sum may
    exceed ``total`` when there are more roles than cores (each still needs one).
    """
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    weight_sum = sum(weights.values()) or 1.0
    return {name: max(1, int(total * w / weight_sum)) for name, w in weights.items()}
