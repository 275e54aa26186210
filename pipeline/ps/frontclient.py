"""Redis connections for the PS front, from :class:`~pipeline.config.RedisSettings`."""

from __future__ import annotations

from typing import Any

from pipeline.config import RedisSettings

__all__ = ["connect"]


def connect(settings: RedisSettings) -> Any:
    """A binary-safe client: ``redis.Redis`` or ``redis.RedisCluster`` (``cluster=True``)."""
    import redis
    from redis.cluster import RedisCluster

    password = settings.password.get_secret_value() if settings.password else None
    if settings.cluster:
        return RedisCluster.from_url(settings.url, password=password)
    return redis.Redis.from_url(settings.url, password=password)
