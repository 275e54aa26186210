"""The publish request a publisher places in every shard stream, and the shard's answer.

A request is a grad-stream ``barrier`` entry named
``publish:<model>:<version>:<parent|->:<complete|->:<max_chunk_bytes>``: stream
order makes it a cut, so the shard stages exactly what it applied before it.
The answer is one field ``<table>:<shard>`` of the hash :func:`acks_key`, holding
:class:`ShardAck` as JSON; staged payloads live under :func:`piece_key` until the
publisher has produced them (with a TTL in case it dies first).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

__all__ = ["PREFIX", "PublishRequest", "ShardAck", "acks_key", "piece_key"]

PREFIX = "publish:"
STAGE_TTL_MS = 15 * 60 * 1000  # staged payloads outlive a publisher that died mid-version


@dataclass(frozen=True)
class PublishRequest:
    """Stage version ``version`` of ``model``; a delta from ``parent`` (None: a base).

    ``complete`` is the latest version whose manifest was published: change logs
    older than it can be dropped.
    """

    model: str
    version: int
    parent: int | None
    complete: int | None
    max_chunk_bytes: int

    def barrier_name(self) -> str:
        def opt(v: int | None) -> str:
            return "-" if v is None else str(v)

        return (
            f"{PREFIX}{self.model}:{self.version}:{opt(self.parent)}:"
            f"{opt(self.complete)}:{self.max_chunk_bytes}"
        )

    @classmethod
    def parse(cls, name: str) -> PublishRequest:
        """The request in a barrier name; ValueError if it is not a well-formed one."""
        if not name.startswith(PREFIX):
            raise ValueError(f"not a publish request: {name!r}")
        parts = name[len(PREFIX) :].split(":")
        if len(parts) != 5:
            raise ValueError(f"publish request needs 5 fields, got {name!r}")

        def opt(v: str) -> int | None:
            return None if v == "-" else int(v)

        model, version, parent, complete, size = parts
        return cls(model, int(version), opt(parent), opt(complete), int(size))


@dataclass
class ShardAck:
    """What one (table, shard) staged for a version."""

    status: str  # "ok", "need_base" (cannot build the delta), "error"
    row_pieces: int = 0
    tombstone_pieces: int = 0
    rows: int = 0
    tombstones: int = 0
    max_event_time: int = 0
    offsets: dict[str, dict[str, int]] = field(default_factory=dict)
    message: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> ShardAck:
        return cls(**json.loads(raw))


def acks_key(model: str, version: int) -> bytes:
    """Hash of the shards' answers for one version."""
    return f"pub:{{{model}}}:{version}:acks".encode()


def piece_key(table: str, shard: int, model: str, version: int, kind: str, index: int) -> bytes:
    """A staged payload (``kind`` ``r`` rows or ``t`` tombstones), hash-tagged like its shard."""
    return f"pub:{{{table}:{shard}}}:{model}:{version}:{kind}{index}".encode()
