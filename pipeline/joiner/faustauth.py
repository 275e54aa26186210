"""Kafka security of the faust engine: :class:`KafkaSettings` as faust credentials.

faust talks to Kafka through aiokafka, not librdkafka, so the settings are mapped
by hand: TLS (CA, client certificate and key) becomes an ``ssl.SSLContext``, SASL
PLAIN and SCRAM become ``faust.SASLCredentials``. What aiokafka cannot honour is
refused with a clear error instead of being dropped: other SASL mechanisms and the
librdkafka pass-through (``PIPELINE_KAFKA_EXTRA``, ``PIPELINE_KAFKA_EXTRA_FILE``).
"""

from __future__ import annotations

import ssl
from typing import Any

from pipeline.config import KafkaSettings
from pipeline.errors import ConfigError

__all__ = ["SASL_MECHANISMS", "broker_credentials"]

#: SASL mechanisms the faust engine supports with a user name and password.
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def _ssl_context(kafka: KafkaSettings) -> ssl.SSLContext:
    ca = str(kafka.ssl_ca_file) if kafka.ssl_ca_file else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    if kafka.ssl_cert_file is not None and kafka.ssl_key_file is not None:
        password = kafka.ssl_key_password
        context.load_cert_chain(
            str(kafka.ssl_cert_file),
            str(kafka.ssl_key_file),
            password.get_secret_value() if password else None,
        )
    return context


def broker_credentials(kafka: KafkaSettings) -> Any:
    """``broker_credentials`` for ``faust.App`` (None for PLAINTEXT), or ConfigError."""
    import faust

    if kafka.extra or kafka.extra_file:
        raise ConfigError(
            "the faust engine cannot apply librdkafka properties (PIPELINE_KAFKA_EXTRA, "
            f"PIPELINE_KAFKA_EXTRA_FILE: {sorted(kafka.extra_config())}); unset them or use "
            "--engine confluent"
        )
    protocol = kafka.security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = _ssl_context(kafka) if protocol in ("SSL", "SASL_SSL") else None
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    mechanism = (kafka.sasl_mechanism or "PLAIN").upper()
    if mechanism not in SASL_MECHANISMS:
        raise ConfigError(
            f"the faust engine supports SASL {', '.join(SASL_MECHANISMS)}, not {mechanism} "
            "(PIPELINE_KAFKA_SASL_MECHANISM); use --engine confluent"
        )
    password = kafka.sasl_password_value()
    if not kafka.sasl_username or password is None:
        raise ConfigError(
            f"security_protocol {protocol} needs PIPELINE_KAFKA_SASL_USERNAME and "
            "PIPELINE_KAFKA_SASL_PASSWORD (or _FILE)"
        )
    return faust.SASLCredentials(
        username=kafka.sasl_username,
        password=password,
        mechanism=mechanism,
        ssl_context=context,
    )
