"""Redis connections for the PS front, from :class:`~pipeline.config.RedisSettings`.

Every Redis client of the roles is made here, so the ACL user, the password (inline
or from a secret file) and TLS are applied in one place. A new client is checked once:
refused credentials or a failed TLS handshake are configuration errors, reported at
once (:class:`RedisAccessError`), while an unreachable Redis is an outage the roles
ride out, so it passes.
"""

from __future__ import annotations

import ssl
from typing import Any

from pipeline.config import RedisSettings
from pipeline.errors import PipelineError

__all__ = ["RedisAccessError", "connect"]

#: How long the check of a new client may wait for Redis (an outage is not an error).
CHECK_TIMEOUT_S = 5.0
_REFUSED = ("NOAUTH", "WRONGPASS", "NOPERM")
_HINT = (
    "check PIPELINE_REDIS_USERNAME, PIPELINE_REDIS_PASSWORD(_FILE) and the "
    "PIPELINE_REDIS_TLS_* files (docs/security.md)"
)


class RedisAccessError(PipelineError):
    """Redis refused this client's credentials, or the TLS handshake failed."""


def connect(settings: RedisSettings, *, check: bool = True, **overrides: Any) -> Any:
    """A binary-safe client: ``redis.Redis`` or ``redis.RedisCluster`` (``cluster=True``).

    ``overrides`` are further ``from_url`` keyword arguments (timeouts, for example).
    With ``check``, raises RedisAccessError when Redis answers but refuses the
    credentials or the TLS handshake fails.
    """
    import redis
    from redis.cluster import RedisCluster

    kwargs = {**settings.client_kwargs(), **overrides}
    if settings.cluster:
        try:  # a cluster client talks to the nodes at once (it reads the slot map)
            return RedisCluster.from_url(settings.url, **kwargs)
        except redis.RedisError as exc:
            _raise_if_refused(exc, settings)
            raise
    client = redis.Redis.from_url(settings.url, **kwargs)
    if check:
        _check(settings, kwargs)
    return client


def _check(settings: RedisSettings, kwargs: dict[str, Any]) -> None:
    import redis

    timeouts = {"socket_connect_timeout": CHECK_TIMEOUT_S, "socket_timeout": CHECK_TIMEOUT_S}
    probe = redis.Redis.from_url(settings.url, **{**kwargs, **timeouts})
    try:
        probe.ping()
    except redis.RedisError as exc:
        _raise_if_refused(exc, settings)  # anything else: an outage, ridden out later
    finally:
        probe.close()


def _raise_if_refused(exc: BaseException, settings: RedisSettings) -> None:
    from redis import exceptions as rx

    where = settings.masked_url()
    text = str(exc)
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError) or (
        isinstance(exc, rx.ResponseError) and text.startswith(_REFUSED)
    ):
        raise RedisAccessError(
            f"Redis at {where} refused the credentials: {text}; {_HINT}"
        ) from None
    if isinstance(exc, rx.ConnectionError) and _tls_failure(exc):
        raise RedisAccessError(f"TLS with Redis at {where} failed: {text}; {_HINT}") from None


def _tls_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError) or "SSL" in str(seen) or "certificate" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
