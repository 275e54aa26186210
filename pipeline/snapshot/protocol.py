"""The Redis side of a snapshot: request, barrier name and the shards' acknowledgements.

The coordinator writes the request hash (:func:`request_key`: the directory the
parts go to), then places a barrier named ``snap:<id>`` in every shard stream of
every table. A shard server meeting that barrier saves what it has applied
before it and answers in the hash :func:`acks_key`, field ``<table>:<shard>``,
with a :class:`PartAck` as JSON. Deleting the request aborts the snapshot: a
shard that meets the barrier afterwards saves nothing.

With trainers (see :mod:`pipeline.snapshot.participant`): live trainers of a job
heartbeat in the sorted set :func:`live_key` (member = trainer id, score = expiry
in ms). The coordinator then lists them in the request (field ``trainers``) and
points :func:`open_key` at the snapshot id instead of placing barriers itself.
Each listed trainer flushes, places its own ``snap:<id>`` barriers, stores its
dense and optimizer state under :func:`trainer_state_key` and registers in
:func:`trainers_key` (field = trainer id, a :class:`TrainerRegistration`). A shard
records the trainers whose barrier it met in :func:`seen_key` and saves at the
barrier that completes the listed set.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

__all__ = [
    "PREFIX",
    "REQUEST_TTL_MS",
    "PartAck",
    "TrainerRegistration",
    "acks_key",
    "barrier_name",
    "live_key",
    "lock_key",
    "open_key",
    "request_key",
    "seen_key",
    "trainer_state_key",
    "trainers_key",
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


def live_key(job: str) -> bytes:
    """Sorted set of a job's live trainers (score: heartbeat expiry, ms since the epoch)."""
    return f"snap:{{live:{job}}}".encode()


def open_key(job: str) -> bytes:
    """The id of the snapshot a job's trainers should join now (absent: none)."""
    return f"snap:{{open:{job}}}".encode()


def trainers_key(snapshot_id: str) -> bytes:
    """Hash of the trainers' registrations (field: trainer id)."""
    return f"snap:{{{snapshot_id}}}:trainers".encode()


def trainer_state_key(snapshot_id: str, trainer_id: str) -> bytes:
    """Packed dense parameters and optimizer state of one trainer at its barrier."""
    return f"snap:{{{snapshot_id}}}:state:{trainer_id}".encode()


def seen_key(snapshot_id: str, table: str, shard: int) -> bytes:
    """Set of trainer ids whose barrier one (table, shard) has met."""
    return f"snap:{{{snapshot_id}}}:seen:{table}:{shard}".encode()


@dataclass
class TrainerRegistration:
    """What one trainer reports when it joins a snapshot: where its cut is."""

    trainer_id: str
    #: next offset per topic and partition (``{topic: {partition: offset}}``): every
    #: message before it is trained and applied by the shards before its barriers
    offsets: dict[str, dict[str, int]]
    dense_table: str
    dense_version: int
    rows: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> TrainerRegistration:
        return cls(**json.loads(raw))


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
