"""Topic declarations (``topics/*.yaml``) and applying them to a cluster.

``apply`` is idempotent: it creates missing topics and reports drift (a
partition count or config that differs from the declaration) without ever
deleting or shrinking anything. Replication is capped at the number of brokers
so the same declarations work on a one-broker dev stack and a real cluster.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PipelineError

__all__ = [
    "TOPIC_KEYS",
    "TopicAction",
    "TopicSpec",
    "TopicsError",
    "apply_topics",
    "default_topics_dir",
    "describe_topics",
    "load_topic_specs",
]

TOPIC_KEYS = frozenset({"name", "partitions", "replication", "configs", "description"})


class TopicsError(PipelineError):
    """A topic declaration is malformed or the cluster refused an operation."""


@dataclass(frozen=True)
class TopicSpec:
    """One declared topic: its logical name and how it is created."""

    name: str
    partitions: int
    replication: int = 1
    configs: Mapping[str, str] = field(default_factory=dict)
    description: str = ""

    def physical_name(self, prefix: str = "") -> str:
        """The name on the cluster (``prefix`` isolates tests and tenants)."""
        return f"{prefix}{self.name}"


@dataclass(frozen=True)
class TopicAction:
    """What ``apply_topics`` did or found for one topic."""

    topic: str
    action: str  # created | exists | drift
    details: tuple[str, ...] = ()


def default_topics_dir() -> Path:
    """``PIPELINE_TOPICS_DIR``, else the ``topics/`` folder of the source tree."""
    env = os.environ.get("PIPELINE_TOPICS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "topics"


def _spec_from_doc(doc: Any, path: Path) -> TopicSpec:
    if not isinstance(doc, dict):
        raise TopicsError(f"{path}: expected a mapping with keys {sorted(TOPIC_KEYS)}")
    unknown = set(doc) - TOPIC_KEYS
    if unknown:
        raise TopicsError(
            f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(TOPIC_KEYS)}"
        )
    for key in ("name", "partitions"):
        if key not in doc:
            raise TopicsError(f"{path}: missing required key '{key}'")
    name, partitions = doc["name"], doc["partitions"]
    replication = doc.get("replication", 1)
    if not isinstance(name, str) or not name:
        raise TopicsError(f"{path}: 'name' must be a non-empty string")
    for key, value in (("partitions", partitions), ("replication", replication)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TopicsError(f"{path}: '{key}' must be a positive integer, got {value!r}")
    configs = doc.get("configs") or {}
    if not isinstance(configs, dict):
        raise TopicsError(f"{path}: 'configs' must be a mapping of Kafka topic configs")
    return TopicSpec(
        name=name,
        partitions=partitions,
        replication=replication,
        configs={str(k): str(v) for k, v in configs.items()},
        description=str(doc.get("description", "")),
    )


def load_topic_specs(directory: Path | None = None) -> list[TopicSpec]:
    """Parse every ``*.yaml`` in ``directory``; one topic per file, names unique."""
    directory = directory or default_topics_dir()
    if not directory.is_dir():
        raise TopicsError(f"topics folder {directory} does not exist (set PIPELINE_TOPICS_DIR)")
    specs: list[TopicSpec] = []
    for path in sorted(directory.glob("*.yaml")):
        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise TopicsError(f"{path}{where}: malformed YAML: {exc}") from None
        specs.append(_spec_from_doc(doc, path))
    if not specs:
        raise TopicsError(f"no topic declarations (*.yaml) in {directory}")
    names = [spec.name for spec in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TopicsError(f"{directory}: topic(s) declared twice: {duplicates}")
    return specs


def _admin(conf: Mapping[str, Any]) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient(dict(conf))


def _existing(admin: Any, timeout: float) -> dict[str, int]:
    from confluent_kafka import KafkaException

    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise TopicsError(f"broker did not answer within {timeout:g} s: {exc}") from None
    return {name: len(meta.partitions) for name, meta in metadata.topics.items()}


def _broker_count(admin: Any, timeout: float) -> int:
    return max(1, len(admin.list_topics(timeout=timeout).brokers))


def _config_drift(admin: Any, topic: str, declared: Mapping[str, str]) -> list[str]:
    from confluent_kafka.admin import ConfigResource

    if not declared:
        return []
    future = admin.describe_configs([ConfigResource("topic", topic)])
    actual = {entry.name: entry.value for entry in next(iter(future.values())).result().values()}
    return [
        f"config {key}: declared {value!r}, actual {actual.get(key)!r}"
        for key, value in sorted(declared.items())
        if actual.get(key) != value
    ]


def apply_topics(
    conf: Mapping[str, Any],
    specs: Iterable[TopicSpec],
    prefix: str = "",
    timeout: float = 10.0,
) -> list[TopicAction]:
    """Create missing topics and report drift of existing ones; never deletes."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import NewTopic

    admin = _admin(conf)
    existing = _existing(admin, timeout)
    brokers = _broker_count(admin, timeout)
    actions: list[TopicAction] = []
    to_create: dict[str, tuple[TopicSpec, Any]] = {}
    for spec in specs:
        name = spec.physical_name(prefix)
        if name in existing:
            drift = []
            if existing[name] != spec.partitions:
                drift.append(f"partitions: declared {spec.partitions}, actual {existing[name]}")
            drift += _config_drift(admin, name, spec.configs)
            actions.append(TopicAction(name, "drift" if drift else "exists", tuple(drift)))
            continue
        replication = min(spec.replication, brokers)
        new = NewTopic(name, spec.partitions, replication, config=dict(spec.configs))
        to_create[name] = (spec, new)
    if to_create:
        futures = admin.create_topics(
            [new for _, new in to_create.values()], request_timeout=timeout
        )
        for name, future in futures.items():
            spec = to_create[name][0]
            try:
                future.result()
            except KafkaException as exc:
                error = exc.args[0]
                if error.name() == "TOPIC_ALREADY_EXISTS":  # created concurrently
                    actions.append(TopicAction(name, "exists"))
                    continue
                raise TopicsError(f"creating topic {name} failed: {error.str()}") from None
            note: tuple[str, ...] = ()
            if spec.replication > brokers:
                note = (f"replication {spec.replication} capped to {brokers} (broker count)",)
            actions.append(TopicAction(name, "created", note))
    return actions


def describe_topics(
    conf: Mapping[str, Any], specs: Iterable[TopicSpec], prefix: str = "", timeout: float = 10.0
) -> list[tuple[str, int | None, TopicSpec]]:
    """(physical name, actual partition count or None if missing, spec) per declared topic."""
    existing = _existing(_admin(conf), timeout)
    return [
        (spec.physical_name(prefix), existing.get(spec.physical_name(prefix)), spec)
        for spec in specs
    ]
