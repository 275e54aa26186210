"""Training: datasets, device cache, the trainer loop and progressive-validation metrics."""

from __future__ import annotations

__all__: list[str] = []
