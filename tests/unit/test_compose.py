"""docker-compose.yml consistency (no Docker engine here, so this is what can be checked)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from pipeline.model.spec import ModelSpec
from pipeline.ps.catalog import load_catalog
from pipeline.ps.keys import ShardKeys
from pipeline.publish.publisher import lock_key as publisher_lock_key
from pipeline.snapshot.protocol import lock_key as snapshot_lock_key
from tests.deploycheck import (
    check_cli_call,
    in_image,
    local_path,
    option,
    parse_cli_call,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PROJECT_IMAGE = "pipeline:local"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


def _project_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if s.get("image") == PROJECT_IMAGE}


_parse = parse_cli_call


def test_project_services_build_from_the_dockerfile(compose: dict[str, Any]) -> None:
    services = _project_services(compose)
    assert "topics" in services
    for name, svc in services.items():
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile", name
        assert (ROOT / svc["build"]["dockerfile"]).is_file()
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    assert 'ENTRYPOINT ["pipeline"]' in dockerfile


def test_every_command_is_a_valid_pipeline_call(compose: dict[str, Any]) -> None:
    for name, svc in _project_services(compose).items():
        command = svc.get("command")
        assert isinstance(command, list) and command, f"{name}: command must be an exec-form list"
        check_cli_call([str(part) for part in command], name)


def test_invalid_command_is_detected() -> None:
    with pytest.raises(click.UsageError):
        _parse(["topics", "apply", "--no-such-flag"])
    with pytest.raises(AssertionError):
        _parse(["no-such-role"])


def _redis_argv(compose: dict[str, Any]) -> list[str]:
    """redis-server's arguments: the command is `sh -c "exec docker-entrypoint.sh
    redis-server ..."` (the password comes from a secret file)."""
    command = [str(c) for c in compose["services"]["redis"]["command"]]
    assert command[:2] == ["sh", "-c"] and len(command) == 3, command
    argv = shlex.split(command[2])
    assert argv[:3] == ["exec", "docker-entrypoint.sh", "redis-server"], argv
    return argv[3:]


def _published(svc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host ip, host port, container port) of each published port."""
    out = []
    for port in svc.get("ports", []):
        parts = str(port).split(":")
        assert len(parts) == 3, f"{port}: publish as HOST_IP:HOST_PORT:CONTAINER_PORT"
        out.append((parts[0], parts[1], parts[2]))
    return out


def test_hosts_ports_and_env_agree(compose: dict[str, Any]) -> None:
    services = compose["services"]
    kafka_env = services["kafka"]["environment"]
    advertised = dict(
        item.split("://", 1) for item in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    )
    internal = advertised[kafka_env["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    redis_port = option(_redis_argv(compose), "--port")
    published: list[str] = []
    for name, svc in services.items():
        for _, host_port, _ in _published(svc):
            published.append(host_port)
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        env = svc.get("environment", {})
        if "PIPELINE_KAFKA_BOOTSTRAP" in env:
            assert env["PIPELINE_KAFKA_BOOTSTRAP"] == internal, name
        if "PIPELINE_REDIS_URL" in env:
            match = re.fullmatch(r"redis://(\w+):(\d+)/\d+", env["PIPELINE_REDIS_URL"])
            assert match and match.group(1) == "redis" and match.group(2) == redis_port, name
    assert len(published) == len(set(published)), f"host ports published twice: {published}"
    # Kafka's maximum message size must admit the largest declared topic message size.
    from pipeline.topics import load_topic_specs

    largest = max(int(s.configs.get("max.message.bytes", 0)) for s in load_topic_specs())
    assert int(kafka_env["KAFKA_MESSAGE_MAX_BYTES"]) >= largest


def test_ps_shards_cover_every_index_once(compose: dict[str, Any]) -> None:
    shards = []
    for name, svc in _project_services(compose).items():
        command = [str(c) for c in svc["command"]]
        if command[0] == "ps":
            total = int(command[command.index("--shards") + 1])
            shards.append((int(command[command.index("--shard") + 1]), total))
            assert any(v.endswith(":/data") for v in svc.get("volumes", [])), (
                f"{name}: no data volume"
            )
    assert shards, "no parameter-server shard service"
    totals = {t for _, t in shards}
    assert len(totals) == 1, f"services disagree on --shards: {totals}"
    assert sorted(s for s, _ in shards) == list(range(totals.pop()))


ROLES = {"topics": ["topics", "apply"], "join": ["join"], "train": ["train"],
         "publish": ["publish", "run"], "snapshot": ["snapshot", "run"], "serve": ["serve"],
         "ps": ["ps"]}  # fmt: skip


def _by_role(compose: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    roles: dict[str, dict[str, dict[str, Any]]] = {}
    for name, svc in _project_services(compose).items():
        command = [str(c) for c in svc["command"]]
        for role, prefix in ROLES.items():
            if command[: len(prefix)] == prefix:
                roles.setdefault(role, {})[name] = svc
    return roles


def test_every_role_is_present(compose: dict[str, Any]) -> None:
    roles = _by_role(compose)
    assert set(roles) == set(ROLES), f"missing roles: {set(ROLES) - set(roles)}"
    assert len(roles["train"]) >= 2, "at least two trainers (one consumer group)"
    ids = [svc["environment"]["PIPELINE_TRAIN_TRAINER_ID"] for svc in roles["train"].values()]
    assert len(ids) == len(set(ids)), f"trainer ids must differ: {ids}"
    for role in ("publish", "snapshot"):
        assert len(roles[role]) == 1, f"exactly one {role} service (one holds the lock anyway)"
    partitions = yaml.safe_load((ROOT / "topics/samples.yaml").read_text())["partitions"]
    assert len(roles["train"]) <= partitions, "more trainers than samples partitions idle"


def test_long_running_roles_have_healthchecks_and_restart(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        if svc.get("restart") == "no":  # one-shot jobs (topics)
            continue
        assert svc.get("restart") in {"unless-stopped", "always", "on-failure"}, name
        test = svc.get("healthcheck", {}).get("test")
        assert isinstance(test, list) and test[0] in {"CMD", "CMD-SHELL"}, f"{name}: no healthcheck"
        if test[:2] == ["CMD", "pipeline"]:
            check_cli_call(test[2:], f"{name} healthcheck")
        if test[:3] == ["CMD", "python", "-c"]:
            compile(test[3], f"{name}-healthcheck", "exec")


def _probe(svc: dict[str, Any]) -> str:
    return str(svc["healthcheck"]["test"][-1])


def test_healthchecks_probe_what_each_role_owns(compose: dict[str, Any]) -> None:
    """The Redis keys and ports in the probes are the ones the code uses."""
    roles = _by_role(compose)
    for name, svc in roles["ps"].items():
        shard = int(option([str(c) for c in svc["command"]], "--shard"))
        tables = [t.name for t in load_catalog(ROOT / "deploy/tables.yaml")]
        assert any(ShardKeys(t, shard).meta.decode() in _probe(svc) for t in tables), name
    for name, svc in roles["publish"].items():
        spec = ModelSpec.from_yaml(local_path(option(svc["command"], "--model")))
        assert publisher_lock_key(spec.name).decode() in _probe(svc), name
    for name, svc in roles["snapshot"].items():
        series = option(svc["command"], "--name") if "--name" in svc["command"] else "default"
        assert snapshot_lock_key(series).decode() in _probe(svc), name
        # The lock lives 600 s and is refreshed once per snapshot.
        assert float(option(svc["command"], "--interval")) < 600, name
    for name, svc in roles["train"].items():
        port = option([str(c) for c in svc["command"]], "--metrics-port")
        # /health: open even when PIPELINE_TRAIN_METRICS_TOKEN guards /metrics
        assert f"127.0.0.1:{port}/health" in _probe(svc), name
    for name, svc in roles["serve"].items():
        port = option([str(c) for c in svc["command"]], "--port")
        assert f"127.0.0.1:{port}/health" in _probe(svc), name
        assert port in [container for _, _, container in _published(svc)], f"{name}: port"


def test_named_volumes_are_declared_and_mounted(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    mounts: dict[str, dict[str, str]] = {}
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source, target = str(volume).split(":")[:2]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} mounts undeclared volume {source}"
            mounts.setdefault(name, {})[target] = source
    roles = _by_role(compose)
    (snap_name, snap), = roles["snapshot"].items()  # fmt: skip
    snap_dir = option(snap["command"], "--dir")
    shared = mounts[snap_name][snap_dir]
    data_volumes = []
    for name, svc in roles["ps"].items():
        assert mounts[name].get(snap_dir) == shared, f"{name} does not mount {shared} at {snap_dir}"
        data_dir = option([str(c) for c in svc["command"]], "--data-dir")
        owner = [t for t in mounts[name] if data_dir == t or data_dir.startswith(t + "/")]
        assert owner, f"{name}: --data-dir {data_dir} is not on a volume"
        data_volumes.append(mounts[name][owner[0]])
    assert len(data_volumes) == len(set(data_volumes)), "each shard needs its own data volume"
    # Mount points must exist in the image owned by the role's user, or named
    # volumes come up root-owned and unwritable.
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    for target in {t for m in mounts.values() for t in m if t.startswith(("/data", "/snap"))}:
        assert re.search(rf"mkdir -p [^\n]*{re.escape(target)}\b", dockerfile), target
        assert re.search(rf"chown pipeline [^\n]*{re.escape(target)}\b", dockerfile), target


def test_files_named_in_commands_are_in_the_image(compose: dict[str, Any]) -> None:
    for name, svc in _project_services(compose).items():
        for arg in (str(c) for c in svc["command"]):
            if arg.startswith("/app/"):
                assert in_image(arg), f"{name}: {arg} is not copied into the image"
                assert local_path(arg).is_file(), arg
                if "/models/" in arg:
                    spec = ModelSpec.from_yaml(local_path(arg))
                    catalog = {t.name for t in load_catalog(ROOT / "deploy/tables.yaml")}
                    assert set(spec.tables()) <= catalog, arg


def test_every_role_has_a_thread_budget_matching_its_cpu_limit(compose: dict[str, Any]) -> None:
    """Roles share a host: each states its CPUs and sets PIPELINE_THREADS to match."""
    import math

    for name, svc in _project_services(compose).items():
        threads = svc.get("environment", {}).get("PIPELINE_THREADS")
        assert threads is not None, f"{name}: no PIPELINE_THREADS"
        assert "cpus" in svc, f"{name}: no cpus limit"
        assert int(threads) == max(1, math.ceil(float(svc["cpus"]))), name


# -- safe by default (docs/security.md) ---------------------------------------------------
SECRETS_DIR = "/run/secrets/"


def test_published_ports_bind_the_host_loopback_only(compose: dict[str, Any]) -> None:
    published = {n: _published(s) for n, s in compose["services"].items() if s.get("ports")}
    assert {"kafka", "redis", "serve"} <= set(published)
    for name, ports in published.items():
        for host_ip, host_port, _ in ports:
            assert host_ip == "127.0.0.1", f"{name}: {host_port} published on {host_ip}"


def test_redis_requires_the_password_from_a_secret(compose: dict[str, Any]) -> None:
    declared = compose.get("secrets") or {}
    argv = _redis_argv(compose)
    password = option(argv, "--requirepass")
    match = re.fullmatch(r"\$\$\(cat (/run/secrets/(\w+))\)", password)
    assert match, f"--requirepass must read a secret file, got {password!r}"
    path, secret = match.group(1), match.group(2)
    assert secret in declared and "file" in declared[secret], f"secret {secret} not declared"
    assert secret in compose["services"]["redis"]["secrets"]
    # the file is not in git: a password never lands in the repository
    source = str(declared[secret]["file"]).removeprefix("./")
    ignored = (ROOT / ".gitignore").read_text().split()
    assert any(source.startswith(rule.strip("/")) for rule in ignored), f"{source} not ignored"
    # the healthcheck authenticates with the same file
    probe = compose["services"]["redis"]["healthcheck"]["test"]
    assert probe[0] == "CMD-SHELL" and f'REDISCLI_AUTH="$$(cat {path})"' in probe[1]
    assert "grep -q PONG" in probe[1], "redis-cli exits 0 on NOAUTH: check the answer"
    # every role reads the password from the same secret file
    for name, svc in _project_services(compose).items():
        env = svc.get("environment", {})
        assert env.get("PIPELINE_REDIS_PASSWORD_FILE") == path, name
        assert secret in svc.get("secrets", []), f"{name}: secret {secret} not mounted"


def test_no_secret_inline_in_the_environment(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|TOKEN|SECRET", key) and not key.endswith("_FILE"):
                pytest.fail(f"{name}: {key} inline; use a secret file ({key}_FILE)")
            if "://" in str(value):
                assert "@" not in str(value), f"{name}: {key} carries credentials"


def test_listeners_for_the_network_bind_all_interfaces_explicitly(
    compose: dict[str, Any],
) -> None:
    """Roles bind 127.0.0.1 by default: what other containers reach must say 0.0.0.0."""
    roles = _by_role(compose)
    for name, svc in roles["serve"].items():
        assert option([str(c) for c in svc["command"]], "--host") == "0.0.0.0", name
    for name, svc in roles["train"].items():
        command = [str(c) for c in svc["command"]]
        if "--metrics-port" in command:
            assert option(command, "--metrics-host") == "0.0.0.0", name
