"""Ingestion: producer SDK, dataset adapters, synthetic traffic, replay, dead letters."""

from __future__ import annotations

__all__: list[str] = []
