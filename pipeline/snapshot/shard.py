"""Shard side of a snapshot: save the table at the ``snap:<id>`` barrier and acknowledge.

Called by the shard server's thread in stream order, so the saved state is
exactly every entry before the barrier in this shard's stream (weights,
optimizer state, statistics and admission of both tiers: what
:func:`~pipeline.ps.export.export_table` writes).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.ps.export import export_table
from pipeline.ps.keys import ShardKeys
from pipeline.ps.staging.tracker import PublishTracker
from pipeline.ps.table import ShardTable
from pipeline.snapshot.layout import sha256_file, shard_dir
from pipeline.snapshot.protocol import (
    PREFIX,
    REQUEST_TTL_MS,
    PartAck,
    acks_key,
    request_key,
    seen_key,
)

__all__ = ["on_barrier"]

log = logging.getLogger(__name__)


def on_barrier(
    client: Any,
    keys: ShardKeys,
    table: ShardTable,
    shards: int,
    name: str | None,
    entry_id: bytes,
    tracker: PublishTracker,
    trainer_id: str = "",
) -> bool:
    """Handle barrier ``name`` if it is a snapshot request (returns whether it was one).

    When the request lists trainers (field ``trainers``), each of them places its
    own barrier: the shard records ``trainer_id`` and saves only at the barrier
    that completes the list (barriers of unlisted trainers are ignored). Without
    the field, the coordinator's single barrier triggers the save.

    Never raises: a failed save is acknowledged as an error so the coordinator
    aborts the snapshot instead of waiting, and the shard keeps serving.
    """
    if not name or not name.startswith(PREFIX):
        return False
    snapshot_id = name[len(PREFIX) :]
    try:
        directory, listed = client.hmget(request_key(snapshot_id), [b"dir", b"trainers"])
        if directory is not None and listed is not None:
            expected = set(json.loads(listed))
            if trainer_id not in expected:
                log.warning(
                    "%s: snapshot %s: barrier of unlisted trainer %r ignored",
                    keys.tag,
                    snapshot_id,
                    trainer_id,
                )
                return True
            seen = seen_key(snapshot_id, keys.table, keys.shard)
            pipe = client.pipeline(transaction=False)
            pipe.sadd(seen, trainer_id)
            pipe.pexpire(seen, REQUEST_TTL_MS)
            pipe.smembers(seen)
            members = {m.decode() for m in pipe.execute()[2]}
            if not expected <= members:
                return True  # later trainers' barriers are still to come
    except Exception:
        log.error("%s: cannot read snapshot request %s", keys.tag, snapshot_id, exc_info=True)
        return True
    if directory is None:  # aborted or expired: save nothing
        log.warning("%s: snapshot %s has no request (aborted?); skipped", keys.tag, snapshot_id)
        return True
    t0 = time.perf_counter()
    try:
        target = Path(directory.decode()) / shard_dir(keys.table, keys.shard, shards)
        meta = export_table(table, target, overwrite=True)
        ack = PartAck(
            "ok",
            rows=int(meta["rows"]),
            stream_id=entry_id.decode(),
            meta_sha256=sha256_file(target / "meta.json"),
            seconds=time.perf_counter() - t0,
            max_event_time=tracker.max_event_time,
            offsets=tracker.offsets,
        )
    except Exception as exc:
        log.error("%s: snapshot %s failed", keys.tag, snapshot_id, exc_info=True)
        ack = PartAck("error", message=f"{type(exc).__name__}: {exc}")
    try:
        pipe = client.pipeline(transaction=False)
        akey = acks_key(snapshot_id)
        pipe.hset(akey, f"{keys.table}:{keys.shard}", ack.to_json())
        pipe.pexpire(akey, REQUEST_TTL_MS)
        pipe.execute()
    except Exception:
        log.error("%s: could not acknowledge snapshot %s", keys.tag, snapshot_id, exc_info=True)
    return True
