"""The error every user-facing failure derives from.

The CLI turns a :class:`PipelineError` into one line on stderr and a non-zero
exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "PipelineError"]


class PipelineError(Exception):
    """A failure the user can act on; its message says what and how to fix it."""


class ConfigError(PipelineError):
    """A setting is missing or invalid; the message names the field and env var."""
