"""Redis and Kafka failures become one line naming what to check; anything else keeps
its traceback (describe() returns None)."""

from __future__ import annotations

import pytest
import redis
from confluent_kafka import KafkaError, KafkaException

from pipeline.cli.failures import describe

pytestmark = pytest.mark.unit


def test_redis_failures() -> None:
    auth = describe(redis.exceptions.AuthenticationError("invalid username-password pair"))
    assert auth and auth.startswith("Redis refused the credentials: invalid username-password")
    assert "PIPELINE_REDIS_PASSWORD" in auth
    noauth = describe(redis.exceptions.ResponseError("NOAUTH Authentication required."))
    assert noauth and noauth.startswith("Redis refused the credentials")
    down = describe(redis.exceptions.ConnectionError("Error 111 connecting to h:1. Refused."))
    assert down and down.startswith("cannot reach Redis: Error 111")
    assert describe(redis.exceptions.ResponseError("WRONGTYPE Operation")) is None  # a bug


def test_kafka_failures() -> None:
    down = describe(KafkaException(KafkaError(KafkaError._TRANSPORT, "Failed to get metadata")))
    assert down == (
        "Kafka: Failed to get metadata; check PIPELINE_KAFKA_BOOTSTRAP / --bootstrap and the "
        "PIPELINE_KAFKA_SECURITY_PROTOCOL, SASL_* and SSL_* settings (docs/security.md)"
    )
    other = describe(KafkaException(KafkaError(KafkaError.TOPIC_ALREADY_EXISTS, "exists")))
    assert other == "Kafka: exists"  # no misleading connection hint


def test_other_errors_keep_their_traceback_and_urls_are_masked() -> None:
    assert describe(ValueError("x")) is None
    text = describe(redis.exceptions.ConnectionError("cannot use redis://u:hunter2@h:1/0"))
    assert text and "hunter2" not in text and "redis://u:***@h:1/0" in text
