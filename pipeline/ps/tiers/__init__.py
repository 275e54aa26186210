"""Cold tiers of a shard table: the abstract contract and its backends (memory, SSD)."""

from __future__ import annotations

from pipeline.ps.tiers.base import ColdTier
from pipeline.ps.tiers.memory import MemoryTier
from pipeline.ps.tiers.ssd import SsdTier

__all__ = ["ColdTier", "MemoryTier", "SsdTier"]
