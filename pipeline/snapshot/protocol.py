"""The Redis side of a snapshot: request, barrier name and the shards' acknowledgements.

The coordinator writes the request hash (:func:`request_key`: the directory the
parts go to), then places a barrier named ``snap:<id>`` in every shard stream of
every table. A shard server meeting that barrier saves what it has applied
before it and answers in the hash :func:`acks_key`, field ``<table>:<shard>``,
with a :class:`PartAck` as JSON. Deleting the request aborts the snapshot: a
shard that meets the barrier afterwards saves nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

__all__ = [
    "PREFIX",
    "REQUEST_TTL_MS",
    "PartAck",
    "acks_key",
    "barrier_name",
    "lock_key",
    "request_key",
]

PREFIX = "snap:"
REQUEST_TTL_MS = 60 * 60 * 1000  # a dead coordinator's request does not live forever


def barrier_name(snapshot_id: str) -> str:
    return f"{PREFIX}{snapshot_id}"


def request_key(snapshot_id: str) -> bytes:
    return f"snap:{{{snapshot_id}}}:req".encode()


def acks_key(snapshot_id: str) -> bytes:
    return f"snap:{{{snapshot_id}}}:acks".encode()


def lock_key(name: str) -> bytes:
    """The single-coordinator lock of a snapshot series (one per ``name``)."""
    return f"snap:{{lock:{name}}}".encode()


def seq_key(name: str) -> bytes:
    return f"snap:{{seq:{name}}}".encode()


@dataclass
class PartAck:
    """What one (table, shard) saved for a snapshot."""

    status: str  # "ok" or "error"
    rows: int = 0
    stream_id: str = ""
    meta_sha256: str = ""
    seconds: float = 0.0
    max_event_time: int = 0
    offsets: dict[str, dict[str, int]] = field(default_factory=dict)
    message: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> PartAck:
        return cls(**json.loads(raw))
