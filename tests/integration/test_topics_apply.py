from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.cli.main import cli
from pipeline.topics import apply_topics, load_topic_specs

pytestmark = pytest.mark.integration


def test_apply_creates_all_topics_then_is_idempotent(
    kafka_conf: dict[str, object], topic_prefix: str
) -> None:
    specs = load_topic_specs()
    first = apply_topics(kafka_conf, specs, prefix=topic_prefix)
    assert {a.action for a in first} == {"created"}
    assert {a.topic for a in first} == {s.physical_name(topic_prefix) for s in specs}
    metadata = AdminClient(dict(kafka_conf)).list_topics(timeout=10)
    for spec in specs:
        assert len(metadata.topics[spec.physical_name(topic_prefix)].partitions) == spec.partitions
    second = apply_topics(kafka_conf, specs, prefix=topic_prefix)
    assert {a.action for a in second} == {"exists"}


def test_drift_is_reported_and_nothing_is_destroyed(
    kafka_conf: dict[str, object], topic_prefix: str, tmp_path: Path
) -> None:
    admin = AdminClient(dict(kafka_conf))
    name = f"{topic_prefix}drifty"
    admin.create_topics([NewTopic(name, 2, 1, config={"retention.ms": "1000"})])[name].result()
    (tmp_path / "drifty.yaml").write_text(
        "name: drifty\npartitions: 4\nconfigs:\n  retention.ms: '5000'\n"
    )
    (action,) = apply_topics(kafka_conf, load_topic_specs(tmp_path), prefix=topic_prefix)
    assert action.action == "drift"
    assert any("partitions: declared 4, actual 2" in d for d in action.details)
    assert any("retention.ms" in d for d in action.details)
    assert len(admin.list_topics(timeout=10).topics[name].partitions) == 2


def test_cli_apply_and_list(kafka_bootstrap: str, topic_prefix: str) -> None:
    runner = CliRunner()
    args = ["--bootstrap", kafka_bootstrap, "--prefix", topic_prefix]
    result = runner.invoke(cli, ["topics", "apply", *args])
    assert result.exit_code == 0, result.output
    assert result.output.count(": created") == 6
    listed = runner.invoke(cli, ["topics", "list", *args])
    assert listed.exit_code == 0, listed.output
    assert "missing" not in listed.output
    for name in (
        "events.impressions",
        "events.clicks",
        "samples",
        "samples.dlq",
        "model.updates",
        "metrics",
    ):
        assert f"{topic_prefix}{name} " in listed.output


def test_cli_reports_unreachable_broker_in_one_line() -> None:
    from pipeline.stack import free_port

    result = CliRunner().invoke(cli, ["topics", "list", "--bootstrap", f"127.0.0.1:{free_port()}"])
    assert result.exit_code == 1
    assert result.output.startswith("error: broker did not answer")
