"""Security settings: Redis ACL/password/TLS, Kafka SSL/SASL and the librdkafka
pass-through, secrets masked wherever settings are printed, and the faust engine's
mapping (or refusal) of them."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli.main import cli
from pipeline.config import KafkaSettings, RedisSettings, load
from pipeline.errors import ConfigError
from pipeline.redact import mask_mapping, mask_url, mask_urls_in
from tests.tlscerts import TLSFiles, make_certs

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("PIPELINE_REDIS_", "PIPELINE_KAFKA_", "PIPELINE_SERVE_")):
            monkeypatch.delenv(name)


# -- masking ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:hunter2@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://alice:hunter2@h:6380/1", "rediss://alice:***@h:6380/1"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://alice@h/0", "redis://alice@h/0"),
    ],
)
def test_url_passwords_are_masked(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert mask_urls_in(f"cannot reach {url}: refused") == f"cannot reach {masked}: refused"


def test_secret_properties_are_masked_by_name() -> None:
    got = mask_mapping(
        {
            "sasl.oauthbearer.client.secret": "s1",
            "ssl.key.pem": "-----BEGIN",
            "ssl.keystore.password": "s2",
            "socket.keepalive.enable": "true",
            "url": "redis://:s3@h/0",
        }
    )
    assert "s1" not in str(got) and "BEGIN" not in str(got) and "s2" not in str(got)
    assert "s3" not in str(got) and got["socket.keepalive.enable"] == "true"


def test_config_show_masks_every_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("file-secret\n")
    monkeypatch.setenv("PIPELINE_REDIS_URL", "redis://alice:url-secret@127.0.0.1:6379/0")
    monkeypatch.setenv("PIPELINE_STACK_REDIS_URL", "redis://:stack-secret@127.0.0.1:1/0")
    monkeypatch.setenv("PIPELINE_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("PIPELINE_KAFKA_SASL_USERNAME", "bob")
    monkeypatch.setenv("PIPELINE_KAFKA_SASL_PASSWORD", "sasl-secret")
    monkeypatch.setenv("PIPELINE_KAFKA_EXTRA__SASL_OAUTHBEARER_CLIENT_SECRET", "extra-secret")
    monkeypatch.setenv("PIPELINE_SERVE_TOKEN", "serve-secret")
    monkeypatch.setenv("PIPELINE_TRAIN_METRICS_TOKEN_FILE", str(token_file))
    result = CliRunner().invoke(cli, ["config", "show"])
    assert result.exit_code == 0, result.output
    for secret in ("url-secret", "stack-secret", "sasl-secret", "extra-secret", "serve-secret",
                   "file-secret"):  # fmt: skip
        assert secret not in result.output, secret
    assert "PIPELINE_REDIS_URL=redis://alice:***@127.0.0.1:6379/0" in result.output
    assert "PIPELINE_SERVE_TOKEN=**********" in result.output


# -- Redis ------------------------------------------------------------------------------
def test_redis_acl_user_and_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "redis_password"
    secret.write_text("s3cret\n")  # a trailing newline, as `echo` writes it
    settings = load(RedisSettings, username="pipeline", password_file=secret)
    assert settings.client_kwargs() == {"username": "pipeline", "password": "s3cret"}
    assert "s3cret" not in repr(settings)
    secret.write_text("rotated")  # read again for every new client
    assert settings.client_kwargs()["password"] == "rotated"


def test_redis_tls_files_go_to_the_client(certs: TLSFiles) -> None:
    settings = load(
        RedisSettings,
        url="rediss://127.0.0.1:6380/0",
        tls_ca_file=certs.ca,
        tls_cert_file=certs.client_cert,
        tls_key_file=certs.client_key,
    )
    assert settings.client_kwargs() == {
        "ssl_check_hostname": True,
        "ssl_ca_certs": str(certs.ca),
        "ssl_certfile": str(certs.client_cert),
        "ssl_keyfile": str(certs.client_key),
    }
    from pipeline.ps.frontclient import connect

    client = connect(settings)  # no connection yet: checks the arguments are accepted
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == str(certs.ca) and kwargs["ssl_certfile"]
    client.close()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"password": "a", "password_file": "__file__"}, "PIPELINE_REDIS_PASSWORD or"),
        ({"password_file": "/nonexistent/pw"}, r"password_file \(PIPELINE_REDIS_PASSWORD_FILE\)"),
        ({"tls_ca_file": "__file__"}, "need a rediss:// URL"),
        ({"url": "rediss://h/0", "tls_cert_file": "__file__"}, "go together"),
        ({"url": "redis://:pw@h/0", "password": "b"}, "given twice"),
    ],
)
def test_bad_redis_security_settings_name_the_fix(
    overrides: dict[str, str], message: str, tmp_path: Path
) -> None:
    some_file = tmp_path / "f"
    some_file.write_text("x")
    given = {k: (str(some_file) if v == "__file__" else v) for k, v in overrides.items()}
    with pytest.raises(ConfigError, match=message):
        load(RedisSettings, **given)


# -- Kafka ------------------------------------------------------------------------------
def test_kafka_ssl_and_sasl_settings_become_librdkafka_properties(
    certs: TLSFiles, tmp_path: Path
) -> None:
    password = tmp_path / "sasl"
    password.write_text("kafka-pw\n")
    settings = load(
        KafkaSettings,
        bootstrap="b1:9093",
        security_protocol="sasl_ssl",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="bob",
        sasl_password_file=password,
        ssl_ca_file=certs.ca,
        ssl_cert_file=certs.client_cert,
        ssl_key_file=certs.client_key,
    )
    assert settings.client_config() == {
        "bootstrap.servers": "b1:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "bob",
        "sasl.password": "kafka-pw",
        "ssl.ca.location": str(certs.ca),
        "ssl.certificate.location": str(certs.client_cert),
        "ssl.key.location": str(certs.client_key),
    }


def test_librdkafka_loads_the_tls_files(certs: TLSFiles, tmp_path: Path) -> None:
    """librdkafka reads the CA, certificate and key when the client is built: a real
    check that the settings make a client it accepts (and one it refuses)."""
    from confluent_kafka import KafkaException

    from pipeline import kafka

    good = load(
        KafkaSettings,
        bootstrap="127.0.0.1:1",
        security_protocol="SSL",
        ssl_ca_file=certs.ca,
        ssl_cert_file=certs.client_cert,
        ssl_key_file=certs.client_key,
    )
    kafka.producer(good).flush(0)
    garbage = tmp_path / "not-a-key.pem"
    garbage.write_text("not a key\n")
    bad = good.model_copy(update={"ssl_key_file": garbage})
    with pytest.raises(KafkaException, match=r"ssl\.key\.location|key"):
        kafka.producer(bad)


def test_kafka_pass_through_from_env_and_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    props = tmp_path / "client.properties"
    props.write_text("# broker-side defaults\nclient.rack = rack-a\nsocket.timeout.ms=1000\n")
    monkeypatch.setenv("PIPELINE_KAFKA_EXTRA_FILE", str(props))
    monkeypatch.setenv("PIPELINE_KAFKA_EXTRA__SOCKET_TIMEOUT_MS", "2000")  # env wins
    monkeypatch.setenv("PIPELINE_KAFKA_EXTRA__SOCKET_KEEPALIVE_ENABLE", "true")
    settings = load(KafkaSettings)
    conf = settings.client_config()
    assert conf["client.rack"] == "rack-a"
    assert conf["socket.timeout.ms"] == "2000"
    assert conf["socket.keepalive.enable"] == "true"
    # the pass-through overrides the roles' own tuning, and reaches every client
    from pipeline import kafka

    monkeypatch.setenv("PIPELINE_KAFKA_EXTRA__LINGER_MS", "50")
    producer = kafka.producer(load(KafkaSettings, bootstrap="127.0.0.1:1"))
    producer.flush(0)
    for make in (lambda s: kafka.consumer(s, "g"), kafka.admin):
        make(load(KafkaSettings, bootstrap="127.0.0.1:1"))  # librdkafka accepts the names


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("PIPELINE_KAFKA_EXTRA__BOOTSTRAP_SERVERS", "PIPELINE_KAFKA_BOOTSTRAP"),
        ("PIPELINE_KAFKA_EXTRA__SASL_PASSWORD", "PIPELINE_KAFKA_SASL_PASSWORD"),
        ("PIPELINE_KAFKA_EXTRA__GROUP_ID", "set by each role"),
        ("PIPELINE_KAFKA_EXTRA__ENABLE_AUTO_COMMIT", "set by each role"),
    ],
)
def test_pass_through_refuses_what_has_a_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, message: str
) -> None:
    monkeypatch.setenv(name, "x")
    with pytest.raises(ConfigError, match=message):
        load(KafkaSettings)


def test_bad_properties_file_names_the_line(tmp_path: Path) -> None:
    props = tmp_path / "client.properties"
    props.write_text("a.b=1\njust words\n")
    with pytest.raises(ConfigError, match="line 2: expected name=value"):
        load(KafkaSettings, extra_file=props)


def test_tls_and_sasl_need_the_matching_protocol(certs: TLSFiles) -> None:
    with pytest.raises(ConfigError, match="need security_protocol SSL or SASL_SSL"):
        load(KafkaSettings, ssl_ca_file=certs.ca)
    with pytest.raises(ConfigError, match="SASL credentials need"):
        load(KafkaSettings, security_protocol="SSL", sasl_username="bob")


# -- the faust engine -------------------------------------------------------------------
def test_faust_engine_maps_tls_and_sasl(certs: TLSFiles) -> None:
    import ssl

    import faust

    from pipeline.joiner.faustauth import broker_credentials

    assert broker_credentials(load(KafkaSettings)) is None
    tls = broker_credentials(
        load(
            KafkaSettings,
            security_protocol="SSL",
            ssl_ca_file=certs.ca,
            ssl_cert_file=certs.client_cert,
            ssl_key_file=certs.client_key,
        )
    )
    assert isinstance(tls, faust.SSLCredentials)
    assert isinstance(tls.context, ssl.SSLContext) and tls.context.verify_mode == ssl.CERT_REQUIRED
    sasl = broker_credentials(
        load(
            KafkaSettings,
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-256",
            sasl_username="bob",
            sasl_password="pw",
            ssl_ca_file=certs.ca,
        )
    )
    assert isinstance(sasl, faust.SASLCredentials)
    assert (sasl.username, sasl.password, sasl.mechanism.value) == ("bob", "pw", "SCRAM-SHA-256")
    assert sasl.protocol.value == "SASL_SSL" and sasl.ssl_context is not None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "GSSAPI",
          "sasl_username": "u", "sasl_password": "p"}, "not GSSAPI"),
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"}, "needs PIPELINE"),
        ({"extra": {"client.rack": "a"}}, "cannot apply librdkafka properties"),
    ],
)  # fmt: skip
def test_faust_engine_refuses_what_it_cannot_honour(
    overrides: dict[str, object], message: str
) -> None:
    from pipeline.joiner.faustauth import broker_credentials

    with pytest.raises(ConfigError, match=message):
        broker_credentials(load(KafkaSettings, **overrides))
