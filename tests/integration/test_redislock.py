"""The single-holder lease (pipeline/redislock.py) on a real redis-server."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.redislock import RedisLock

pytestmark = pytest.mark.integration


def test_one_holder_at_a_time_and_a_restarted_holder_takes_its_lease_back(
    redis_client: Any, unique: str
) -> None:
    key = f"lock:{unique}".encode()
    first = RedisLock(redis_client, key, ttl_ms=60_000, holder="publisher-0")
    assert first.acquire()
    assert not RedisLock(redis_client, key, ttl_ms=60_000).acquire()  # anyone else waits
    assert not RedisLock(redis_client, key, ttl_ms=60_000, holder="publisher-1").acquire()
    # the same holder after a crash (a new process, a new object): at once, not after the ttl
    restarted = RedisLock(redis_client, key, ttl_ms=60_000, holder="publisher-0")
    assert restarted.acquire()
    restarted.release()
    other = RedisLock(redis_client, key, ttl_ms=60_000)
    assert other.acquire()  # released: free for anyone
    assert not restarted.acquire()
    other.release()
