from __future__ import annotations

import pytest

from pipeline.config import KafkaSettings, RedisSettings, StackSettings, env_var, load
from pipeline.errors import ConfigError

pytestmark = pytest.mark.unit


def test_defaults_point_at_the_embedded_stack() -> None:
    assert load(KafkaSettings).bootstrap == "127.0.0.1:19092"
    assert load(RedisSettings).url == "redis://127.0.0.1:16379/0"


def test_env_vars_set_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_KAFKA_BOOTSTRAP", "kafka:9092")
    monkeypatch.setenv("PIPELINE_KAFKA_SESSION_TIMEOUT_MS", "3000")
    settings = load(KafkaSettings)
    assert (settings.bootstrap, settings.session_timeout_ms) == ("kafka:9092", 3000)


def test_explicit_overrides_beat_env_and_none_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_STACK_BROKER_PORT", "2000")
    assert load(StackSettings, broker_port=3000).broker_port == 3000
    assert load(StackSettings, broker_port=None).broker_port == 2000


def test_validation_error_names_field_and_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_KAFKA_SESSION_TIMEOUT_MS", "soon")
    with pytest.raises(
        ConfigError, match=r"session_timeout_ms \(PIPELINE_KAFKA_SESSION_TIMEOUT_MS\)"
    ):
        load(KafkaSettings)


def test_allowed_values_are_named() -> None:
    with pytest.raises(ConfigError, match="security_protocol.*PLAINTEXT, SSL"):
        load(KafkaSettings, security_protocol="carrier-pigeon")
    with pytest.raises(ConfigError, match="url.*redis://"):
        load(RedisSettings, url="http://localhost")


def test_secrets_are_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")  # credentials need SASL
    monkeypatch.setenv("PIPELINE_KAFKA_SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("PIPELINE_REDIS_PASSWORD", "swordfish")
    kafka, redis = load(KafkaSettings), load(RedisSettings)
    for text in (repr(kafka), str(kafka), repr(redis), str(redis), kafka.model_dump_json()):
        assert "hunter2" not in text and "swordfish" not in text
    assert kafka.client_config()["sasl.password"] == "hunter2"


def test_settings_are_frozen() -> None:
    settings = load(KafkaSettings)
    with pytest.raises(ValueError):
        settings.bootstrap = "elsewhere:9092"  # type: ignore[misc]


def test_env_var_helper() -> None:
    assert env_var(StackSettings, "state_dir") == "PIPELINE_STACK_STATE_DIR"


def test_configuration_reference_is_current() -> None:
    from pathlib import Path

    from click.testing import CliRunner

    from pipeline.cli.main import cli

    generated = CliRunner().invoke(cli, ["config", "docs"]).output
    committed = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    assert committed.strip() == generated.strip(), (
        "run: pipeline config docs > docs/configuration.md"
    )
