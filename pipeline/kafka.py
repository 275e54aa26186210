"""confluent-kafka clients built from :class:`~pipeline.config.KafkaSettings`.

Every role gets its producers and consumers here, so security settings and the
local-profile timeouts are applied in one place. Precedence, lowest first: the
roles' tuning below, the user's settings (``KafkaSettings.client_config``: security
and the ``PIPELINE_KAFKA_EXTRA`` pass-through), the caller's keyword settings.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import KafkaSettings

__all__ = ["admin", "consumer", "producer"]


def producer(settings: KafkaSettings, **extra: Any) -> Any:
    """A Producer tuned for batches of a few MB (idempotent, lz4, short linger)."""
    from confluent_kafka import Producer

    conf = {
        "linger.ms": 5,
        "compression.type": "lz4",
        "enable.idempotence": True,
        "message.max.bytes": 16 * 1024 * 1024,
        **settings.client_config(),
        **extra,
    }
    return Producer(conf)


def consumer(settings: KafkaSettings, group_id: str, **extra: Any) -> Any:
    """A Consumer in ``group_id``; offsets are committed by the caller, never automatically."""
    from confluent_kafka import Consumer

    conf = {
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": settings.session_timeout_ms,
        "heartbeat.interval.ms": max(500, settings.session_timeout_ms // 4),
        "fetch.max.bytes": 64 * 1024 * 1024,
        "max.partition.fetch.bytes": 16 * 1024 * 1024,
        **settings.client_config(),
        **extra,
    }
    return Consumer(conf)


def admin(settings: KafkaSettings, **extra: Any) -> Any:
    """An AdminClient (quiet: errors surface as exceptions, not log lines)."""
    from confluent_kafka.admin import AdminClient

    return AdminClient({"log_level": 0, **settings.client_config(), **extra})
