"""Security against real services: a shard server (`pipeline ps`) and a trainer on a
redis-server that speaks only TLS, asks for client certificates, and has a password on
the default user plus an ACL user; clear one-line errors (no traceback) when the
credentials, the CA or the broker are wrong."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from pipeline.codec.samplebatch import encode_batch
from pipeline.config import RedisSettings, load
from pipeline.ingest.generator import TrafficConfig, TrafficGenerator
from pipeline.ps.frontclient import connect
from pipeline.stack import free_port, redis_argv
from pipeline.train.metrics_sink import RedisMetricsSink
from tests.e2eutil import write_specs
from tests.tlscerts import TLSFiles, make_certs

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "admin-pw-for-the-default-user"
USER, USER_PASSWORD = "pipeline", "pipeline-acl-pw"


@dataclass(frozen=True)
class SecureRedis:
    url: str
    certs: TLSFiles
    password_file: Path

    def env(self, **changes: str | None) -> dict[str, str]:
        """The environment of a role that reaches this Redis (``changes``: None unsets)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_REDIS_")}
        env |= {
            "PIPELINE_REDIS_URL": self.url,
            "PIPELINE_REDIS_USERNAME": USER,
            "PIPELINE_REDIS_PASSWORD_FILE": str(self.password_file),
            "PIPELINE_REDIS_TLS_CA_FILE": str(self.certs.ca),
            "PIPELINE_REDIS_TLS_CERT_FILE": str(self.certs.client_cert),
            "PIPELINE_REDIS_TLS_KEY_FILE": str(self.certs.client_key),
        }
        for key, value in changes.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def settings(self) -> RedisSettings:
        return load(
            RedisSettings,
            url=self.url,
            username=USER,
            password_file=self.password_file,
            tls_ca_file=self.certs.ca,
            tls_cert_file=self.certs.client_cert,
            tls_key_file=self.certs.client_key,
        )


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


@pytest.fixture
def secure_redis(tmp_path: Path) -> Iterator[SecureRedis]:
    """redis-server on a free port: TLS only (plain port 0), client certificates
    required, requirepass on the default user, ACL user ``pipeline`` without the
    dangerous commands (what docs/security.md recommends: the roles need none of them)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not found")
    certs = make_certs(tmp_path / "tls")
    port = free_port()
    argv = [
        *redis_argv(binary, "127.0.0.1", 0, tmp_path),
        "--tls-port", str(port),
        "--tls-cert-file", str(certs.server_cert),
        "--tls-key-file", str(certs.server_key),
        "--tls-ca-cert-file", str(certs.ca),
        "--tls-auth-clients", "yes",
        "--requirepass", ADMIN_PASSWORD,
        "--user", USER, "on", f">{USER_PASSWORD}", "~*", "&*", "+@all", "-@dangerous",
    ]  # fmt: skip
    log = tmp_path / "redis.log"
    proc = subprocess.Popen(
        argv, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    password_file = tmp_path / "redis_password"
    password_file.write_text(USER_PASSWORD + "\n")
    server = SecureRedis(f"rediss://127.0.0.1:{port}/0", certs, password_file)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                text = log.read_text()
                if "TLS" in text and ("not supported" in text or "Bad directive" in text):
                    pytest.skip(f"this redis-server was built without TLS: {text[-300:]}")
                pytest.fail(f"redis-server exited: {text[-2000:]}")
            try:
                client = connect(server.settings(), socket_connect_timeout=1)
                if client.ping():
                    client.close()
                    break
            except Exception:
                assert time.monotonic() < deadline, f"redis-server did not answer: {log}"
                time.sleep(0.1)
        yield server
    finally:
        _kill_group(proc)


def _pipeline(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "--log-level", "info", *args],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        start_new_session=True,
        env=env,
    )


def _run(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def test_ps_and_trainer_over_tls_with_an_acl_user(
    secure_redis: SecureRedis,
    kafka_bootstrap: str,
    project_topics: dict[str, str],
    topic_prefix: str,
    unique: str,
    tmp_path: Path,
) -> None:
    rows, per_message = 2_000, 250
    catalog, model = write_specs(tmp_path, unique)
    env = secure_redis.env()
    client = connect(secure_redis.settings())
    assert client.acl_whoami() == USER
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.flushall()  # the ACL holds: this user cannot wipe the parameters
    procs: list[subprocess.Popen[str]] = []
    try:
        procs.append(_pipeline("ps", "--tables", str(catalog), env=env, log=tmp_path / "ps.log"))
        deadline = time.monotonic() + 60
        while not client.exists(f"ps:table:{{{unique}_deep}}".encode()):
            assert procs[0].poll() is None, (tmp_path / "ps.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the shard server did not register its tables"
            time.sleep(0.2)
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
        gen = TrafficGenerator(TrafficConfig(seed=3))
        for i, (batch, _) in enumerate(gen.samples(rows, per_message)):
            producer.produce(project_topics["samples"], encode_batch(batch), partition=i % 6)
        assert producer.flush(30) == 0
        job = f"job{unique}"
        trainer = _pipeline(
            "train", "--config", str(model), "--tables", str(catalog), "--job", job,
            "--trainer-id", "t0", "--max-rows", str(rows), "--json",
            "--bootstrap", kafka_bootstrap, "--prefix", topic_prefix,
            env=env, log=tmp_path / "train.log",
        )  # fmt: skip
        procs.append(trainer)
        out, _ = trainer.communicate(timeout=240)
        assert trainer.returncode == 0, (tmp_path / "train.log").read_text()[-3000:]
        assert json.loads(out)["rows"] == rows
        counts, _ = RedisMetricsSink(client, job).global_cumulative()
        assert int(counts.summary()["samples"]) == rows  # the metrics went through TLS too
        assert client.hlen(f"ps:{{{unique}_deep:0}}:meta".encode()) > 0
    finally:
        for proc in procs:
            _kill_group(proc)
        client.close()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (  # no password: the default user needs one
            {"PIPELINE_REDIS_USERNAME": None, "PIPELINE_REDIS_PASSWORD_FILE": None},
            "refused the credentials",
        ),
        ({"PIPELINE_REDIS_PASSWORD_FILE": None, "PIPELINE_REDIS_PASSWORD": "wrong"},
         "refused the credentials"),
        ({"PIPELINE_REDIS_TLS_CA_FILE": None}, "failed: "),  # the server is not trusted
    ],
    ids=["no-password", "wrong-password", "no-ca"],
)  # fmt: skip
def test_ps_with_wrong_credentials_says_so_in_one_line(
    secure_redis: SecureRedis, changes: dict[str, str | None], expected: str
) -> None:
    done = _run("ps", env=secure_redis.env(**changes))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], done.stderr
    assert errors[0].startswith(("error: Redis at rediss://", "error: TLS with Redis at")), errors
    assert USER_PASSWORD not in done.stderr and "wrong" not in errors[0].split(";")[-1]


def test_dlq_inspect_against_an_unreachable_broker_says_so_in_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_KAFKA_")}
    done = _run("dlq", "inspect", "--bootstrap", f"127.0.0.1:{free_port()}", env=env)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: Kafka: "), done.stderr
