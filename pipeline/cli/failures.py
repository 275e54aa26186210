"""Redis and Kafka failures a user can fix, as one line instead of a traceback.

A role that cannot reach Redis or the broker, or whose credentials are refused,
raises the client library's exception from wherever it first talks to the service.
The CLI entry point asks :func:`describe` for a message; ``None`` means the
exception is not one of these and keeps its traceback (a bug).
"""

from __future__ import annotations

from pipeline.redact import mask_urls_in

__all__ = ["describe"]

_REDIS_AUTH_WORDS = ("NOAUTH", "WRONGPASS", "NOPERM", "AUTH", "Authentication")
_REDIS_HINT = (
    "check PIPELINE_REDIS_URL / --redis-url, PIPELINE_REDIS_USERNAME, "
    "PIPELINE_REDIS_PASSWORD(_FILE) and the PIPELINE_REDIS_TLS_* files (docs/security.md)"
)
_KAFKA_HINT = (
    "check PIPELINE_KAFKA_BOOTSTRAP / --bootstrap and the PIPELINE_KAFKA_SECURITY_PROTOCOL, "
    "SASL_* and SSL_* settings (docs/security.md)"
)


def describe(exc: BaseException) -> str | None:
    """One line naming the service, what went wrong and what to check; None: not ours."""
    text = _redis(exc) or _kafka(exc)
    return None if text is None else mask_urls_in(text)


def _redis(exc: BaseException) -> str | None:
    try:
        from redis import exceptions as rx
    except ImportError:  # pragma: no cover - redis is a dependency
        return None
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError) or (
        isinstance(exc, rx.ResponseError) and detail.startswith(_REDIS_AUTH_WORDS)
    ):
        return f"Redis refused the credentials: {detail}; {_REDIS_HINT}"
    if isinstance(exc, rx.ConnectionError | rx.TimeoutError):
        return f"cannot reach Redis: {detail}; {_REDIS_HINT}"
    if isinstance(exc, rx.RedisClusterException):
        return f"Redis Cluster: {detail}; {_REDIS_HINT}"
    return None


def _kafka(exc: BaseException) -> str | None:
    try:
        from confluent_kafka import KafkaError, KafkaException
    except ImportError:  # pragma: no cover - confluent-kafka is a dependency
        return None
    if not isinstance(exc, KafkaException):
        return None
    error = exc.args[0] if exc.args else None
    if not isinstance(error, KafkaError):
        return f"Kafka: {exc}"
    reach = {
        KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT,
        KafkaError._RESOLVE, KafkaError._AUTHENTICATION, KafkaError._SSL,
        KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    }  # fmt: skip
    hint = f"; {_KAFKA_HINT}" if error.code() in reach else ""
    return f"Kafka: {error.str()}{hint}"
