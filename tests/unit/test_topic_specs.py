from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.topics import TopicsError, load_topic_specs

pytestmark = pytest.mark.unit

ARCHITECTURE_TOPICS = {
    "events.impressions",
    "events.clicks",
    "samples",
    "samples.dlq",
    "model.updates",
    "metrics",
}


def test_project_declares_every_topic_of_the_architecture() -> None:
    specs = {spec.name: spec for spec in load_topic_specs()}
    assert set(specs) == ARCHITECTURE_TOPICS
    chunk_limit = int(specs["model.updates"].configs["max.message.bytes"])
    assert chunk_limit >= 1 << 20
    assert "compact" in specs["metrics"].configs["cleanup.policy"]
    assert specs["model.updates"].partitions == 1  # chunk order within a version


def _write(tmp_path: Path, text: str, name: str = "t.yaml") -> Path:
    (tmp_path / name).write_text(text)
    return tmp_path


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    _write(tmp_path, "name: x\npartitions: [1,\n")
    with pytest.raises(TopicsError, match=r"t\.yaml line \d+: malformed YAML"):
        load_topic_specs(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\npartitions: 1\nretention: 5\n", "unknown key"),
        ("partitions: 1\n", "missing required key 'name'"),
        ("name: x\npartitions: 0\n", "'partitions' must be a positive integer"),
        ("name: x\npartitions: 1\nreplication: two\n", "'replication' must be a positive integer"),
        ("name: x\npartitions: 1\nconfigs: [a]\n", "'configs' must be a mapping"),
        ("- just a list\n", "expected a mapping"),
    ],
)
def test_invalid_declarations_are_rejected(tmp_path: Path, text: str, message: str) -> None:
    _write(tmp_path, text)
    with pytest.raises(TopicsError, match=message):
        load_topic_specs(tmp_path)


def test_duplicate_and_missing_declarations(tmp_path: Path) -> None:
    with pytest.raises(TopicsError, match="no topic declarations"):
        load_topic_specs(tmp_path)
    _write(tmp_path, "name: x\npartitions: 1\n", "a.yaml")
    _write(tmp_path, "name: x\npartitions: 2\n", "b.yaml")
    with pytest.raises(TopicsError, match="declared twice"):
        load_topic_specs(tmp_path)


def test_configs_are_strings_and_prefix_maps_names(tmp_path: Path) -> None:
    _write(tmp_path, "name: x\npartitions: 2\nconfigs:\n  retention.ms: 1000\n")
    (spec,) = load_topic_specs(tmp_path)
    assert spec.configs == {"retention.ms": "1000"}
    assert spec.physical_name("t1.") == "t1.x"
