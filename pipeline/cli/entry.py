"""The console-script entry point: apply the thread budget, then run the CLI.

The OpenMP and BLAS runtimes read their thread settings once, when torch or numpy
load them, and the CLI's subcommands import both. So the budget (``--threads`` before
the subcommand, else ``PIPELINE_THREADS``, else the CPUs available) goes into the
environment here, before :mod:`pipeline.cli.main` is imported.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    """``pipeline ...`` and ``python -m pipeline.cli ...``."""
    from pipeline import threads
    from pipeline.errors import ConfigError

    try:
        budget = threads.resolve(threads.budget_from_argv(sys.argv[1:]))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    threads.apply_env(budget)
    from pipeline.cli.main import main as run

    run()
