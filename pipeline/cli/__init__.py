"""The ``pipeline`` command line: one entry point, one module per command group."""

from __future__ import annotations

__all__: list[str] = []
