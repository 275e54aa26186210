"""The Redis key layout keeps every multi-key command of the roles in one cluster slot.

Redis Cluster refuses a command, transaction or script whose keys map to different
slots (CROSSSLOT). Each group below is used together by one command (MGET/MSET of
pull-view keys, the push script on a shard's stream and meta, the coordinator's DEL
of a snapshot's keys) or belongs to one owner whose keys are documented to share a
hash tag; the slot is computed as a cluster client does (``redis.crc.key_slot``).
"""

from __future__ import annotations

import numpy as np
import pytest
from redis.crc import key_slot

from pipeline.ps.client import registry_key
from pipeline.ps.dense import dense_key
from pipeline.ps.keys import ShardKeys
from pipeline.ps.staging.requests import acks_key as publish_acks_key
from pipeline.ps.staging.requests import piece_key
from pipeline.publish.publisher import lock_key as publisher_lock_key
from pipeline.publish.publisher import state_key
from pipeline.snapshot import protocol
from pipeline.train.metrics_sink import RedisMetricsSink

pytestmark = pytest.mark.unit


def _slots(keys: list[bytes | str]) -> set[int]:
    return {key_slot(k.encode() if isinstance(k, str) else k) for k in keys}


@pytest.mark.parametrize("table, shard", [("wide", 0), ("deep", 3), ("a_b-c.d", 4095)])
def test_a_shards_keys_share_one_slot(table: str, shard: int) -> None:
    keys = ShardKeys(table, shard)
    # ids whose bytes include '{', '}' and NUL: the tag is the first {...}, before the id
    ids = np.array([0, 1, ord("{"), ord("}") << 56, 2**64 - 1, 0x7B7D7B7D], dtype=np.uint64)
    group = [keys.stream, keys.meta, *keys.pull_keys(ids)]
    group += [piece_key(table, shard, "model", 7, kind, i) for kind in "rt" for i in range(3)]
    assert _slots(group) == {key_slot(keys.tag.encode())}


def test_shards_of_a_table_spread_over_slots() -> None:
    """Not one slot per table: a table's shards land on different nodes of a cluster."""
    slots = _slots([ShardKeys("wide", s).stream for s in range(16)])
    assert len(slots) == 16


def test_pull_view_mset_and_mget_name_the_shards_keys() -> None:
    keys = ShardKeys("wide", 2)
    ids = np.array([5, 9], dtype=np.uint64)
    rows = np.ones((2, 1), np.float32)
    for command in (keys.mget_command(ids), keys.mset_command(ids, rows)):
        assert command.count(keys.pull_prefix) == 2
    assert _slots(keys.pull_keys(ids)) == _slots([keys.meta])


def test_a_publishers_keys_share_its_models_slot() -> None:
    model = "ctr_deepfm"
    group = [state_key(model), publisher_lock_key(model)]
    group += [publish_acks_key(model, v) for v in (1, 2, 10_000)]
    assert len(_slots(group)) == 1


def test_a_snapshots_keys_share_its_ids_slot() -> None:
    """The coordinator deletes request, acks, registrations and trainer states in one DEL."""
    sid = "20260101T000000Z-000042"
    group = [
        protocol.request_key(sid),
        protocol.acks_key(sid),
        protocol.trainers_key(sid),
        *(protocol.trainer_state_key(sid, t) for t in ("t0", "host-1234", "a{b}c")),
        *(protocol.seen_key(sid, t, s) for t in ("wide", "deep") for s in range(4)),
    ]
    assert len(_slots(group)) == 1


def test_a_jobs_metrics_keys_share_one_slot() -> None:
    sink = RedisMetricsSink(None, "job-7")
    group = [sink.cum_key, sink.windows_key, *(sink.window_key(ms) for ms in (0, 10_000, 2**40))]
    assert len(_slots(group)) == 1


@pytest.mark.parametrize(
    "key",
    [
        dense_key("m_dense"),
        registry_key("wide"),
        protocol.lock_key("default"),
        protocol.seq_key("default"),
        protocol.live_key("job"),
        protocol.open_key("job"),
    ],
)
def test_single_key_names_carry_a_hash_tag(key: bytes) -> None:
    """Keys used alone still carry a tag, so a future command pairing them with their
    owner's other keys (a script, a transaction) cannot cross slots by accident."""
    assert b"{" in key and key.index(b"}") > key.index(b"{") + 1
