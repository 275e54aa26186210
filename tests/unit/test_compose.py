"""docker-compose.yml consistency (no Docker engine here, so this is what can be checked)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli.main import cli

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


def _parse(args: list[str]) -> list[str]:
    """Parse ``pipeline ARGS`` down to the leaf command without running it.

    Returns the subcommand path; raises on an unknown subcommand or option.
    """
    command: click.Command = cli
    path: list[str] = []
    rest = list(args)
    while isinstance(command, click.Group):
        assert rest, f"{args}: a command group needs a subcommand"
        name, *rest = rest
        sub = command.get_command(click.Context(command), name)
        assert sub is not None, f"unknown subcommand {name!r} in {args}"
        command = sub
        path.append(name)
    command.make_context(path[-1], rest)  # parses the options: UsageError when invalid
    return path


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
        path = _parse([str(part) for part in command])
        result = CliRunner().invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, f"{name}: pipeline {' '.join(path)} --help: {result.output}"


def test_invalid_command_is_detected() -> None:
    with pytest.raises(click.UsageError):
        _parse(["topics", "apply", "--no-such-flag"])
    with pytest.raises(AssertionError):
        _parse(["no-such-role"])


def test_hosts_ports_and_env_agree(compose: dict[str, Any]) -> None:
    services = compose["services"]
    kafka_env = services["kafka"]["environment"]
    advertised = dict(
        item.split("://", 1) for item in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    )
    internal = advertised[kafka_env["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    redis_port = services["redis"]["command"][services["redis"]["command"].index("--port") + 1]
    published: list[str] = []
    for name, svc in services.items():
        for port in svc.get("ports", []):
            published.append(str(port).split(":")[0])
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
