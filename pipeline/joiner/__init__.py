"""The joiner: impressions + clicks -> labelled, batched samples (``pipeline join``).

``logic`` is the pure per-partition join, ``engine`` the message-level core, and
``runner`` (confluent-kafka) and ``app`` (faust) the two engines; see docs/joiner.md.
"""

from __future__ import annotations

from pipeline.joiner.logic import JoinConfig, Kind, PartitionJoiner
from pipeline.joiner.settings import JoinerSettings

__all__ = ["JoinConfig", "JoinerSettings", "Kind", "PartitionJoiner"]
