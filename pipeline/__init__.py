"""Streaming online learning of large sparse recommendation models on Kafka.

The package is organised in layers (bottom up): ``config``, ``codec`` ->
``topics``, ``ps``, ``ingest``, ``model`` -> ``train``, ``joiner``, ``stack`` ->
``publish`` -> ``cli``. Importing it has no side effects.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
