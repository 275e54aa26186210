"""Shared fixtures: one real broker and one real redis-server per test session.

Both are started by :class:`pipeline.stack.EmbeddedStack` (the code users run)
on free loopback ports in a temporary state dir, and stopped at the end. Each
test gets its own topic prefix and consumer group, so tests never share state.
Tests that need a service skip with the reason when its binary is missing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.config import StackSettings
from pipeline.stack import (
    EmbeddedStack,
    StackError,
    find_broker_binary,
    find_redis_binary,
    free_port,
)
from tests.procgroups import ProcessGroups

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def stack_binaries() -> None:
    """Skips (with the reason) when the broker or redis-server binary is missing."""
    try:
        find_broker_binary()
        find_redis_binary()
    except StackError as exc:
        pytest.skip(f"embedded stack unavailable: {exc}")


@pytest.fixture(scope="session")
def stack(
    stack_binaries: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedStack]:
    """Broker + Redis for the whole session (skips when a binary is missing)."""
    settings = StackSettings(
        state_dir=tmp_path_factory.mktemp("stack"),
        broker_port=free_port(),
        redis_port=free_port(),
        start_timeout_s=30,
    )
    embedded = EmbeddedStack(settings)
    embedded.up()
    try:
        yield embedded
    finally:
        embedded.down()


@pytest.fixture(scope="session")
def kafka_bootstrap(stack: EmbeddedStack) -> str:
    return stack.bootstrap


@pytest.fixture(scope="session")
def redis_url(stack: EmbeddedStack) -> str:
    return stack.redis_url


@pytest.fixture
def unique() -> str:
    """A short id unique to this test (for topic prefixes, groups, table names)."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def topic_prefix(unique: str) -> str:
    return f"t{unique}."


@pytest.fixture
def group_id(unique: str) -> str:
    return f"g{unique}"


@pytest.fixture
def kafka_conf(kafka_bootstrap: str) -> dict[str, object]:
    return {"bootstrap.servers": kafka_bootstrap}


@pytest.fixture
def project_topics(kafka_conf: dict[str, object], topic_prefix: str) -> dict[str, str]:
    """All declared topics created under this test's prefix: logical -> physical name."""
    from pipeline.topics import apply_topics, load_topic_specs

    specs = load_topic_specs()
    apply_topics(kafka_conf, specs, prefix=topic_prefix)
    return {spec.name: spec.physical_name(topic_prefix) for spec in specs}


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[object]:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local 3-master Redis Cluster for the session (tests/rediscluster.py); its URL."""
    from tests.rediscluster import redis_cluster

    try:
        find_redis_binary()
    except StackError as exc:
        pytest.skip(f"Redis Cluster unavailable: {exc}")
    with redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as nodes:
        yield nodes.url


@pytest.fixture
def processes() -> Iterator[ProcessGroups]:
    """Starts processes in their own groups; kills every group at teardown, pass or fail."""
    with ProcessGroups() as owned:
        yield owned


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real Criteo/Avazu samples); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"sample data folder {SHARED_DATA} is absent")
    return SHARED_DATA
