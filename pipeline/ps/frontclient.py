"""Redis connections for the PS front, from :class:`~pipeline.config.RedisSettings`.

Every Redis client of the roles is made here, so the ACL user, the password (inline
or from a secret file) and TLS are applied in one place.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import RedisSettings

__all__ = ["connect"]


def connect(settings: RedisSettings, **overrides: Any) -> Any:
    """A binary-safe client: ``redis.Redis`` or ``redis.RedisCluster`` (``cluster=True``).

    ``overrides`` are further ``from_url`` keyword arguments (timeouts, for example).
    """
    import redis
    from redis.cluster import RedisCluster

    kwargs = {**settings.client_kwargs(), **overrides}
    if settings.cluster:
        return RedisCluster.from_url(settings.url, **kwargs)
    return redis.Redis.from_url(settings.url, **kwargs)
