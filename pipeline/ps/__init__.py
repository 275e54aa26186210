"""Parameter server: sparse tables (hot memory + cold SSD tiers), optimizers, Redis front.

Only the names a shard server or a model config needs are exported here; the
tiers live in :mod:`pipeline.ps.tiers` (importing them pulls in RocksDB).
"""

from __future__ import annotations

from pipeline.ps.spec import TableSpec
from pipeline.ps.table import ApplyResult, PushRejected, ShardTable

__all__ = ["ApplyResult", "PushRejected", "ShardTable", "TableSpec"]
