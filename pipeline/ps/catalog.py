"""The table catalog: a YAML file listing every sparse table of a model.

Shard servers and trainers read the same file, so both agree on dims and
optimizers. Format: ``tables:`` followed by a list of :class:`TableSpec` dicts.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from pipeline.errors import ConfigError
from pipeline.ps.spec import TableSpec

__all__ = ["default_catalog_path", "load_catalog"]


def default_catalog_path() -> Path:
    """``deploy/tables.yaml`` of the source tree (``PIPELINE_PS_TABLES`` overrides)."""
    env = os.environ.get("PIPELINE_PS_TABLES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "deploy" / "tables.yaml"


def load_catalog(path: Path | None = None) -> list[TableSpec]:
    """Parse and validate the table specs in ``path``; errors name the file and field."""
    path = path or default_catalog_path()
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"table catalog {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"table catalog {path}: malformed YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tables"), list) or not doc["tables"]:
        raise ConfigError(f"table catalog {path}: expected 'tables:' with a non-empty list")
    specs = []
    for i, item in enumerate(doc["tables"]):
        try:
            specs.append(TableSpec.from_dict(item))
        except ConfigError as exc:
            raise ConfigError(f"table catalog {path}: tables[{i}]: {exc}") from None
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"table catalog {path}: duplicate table names in {names}")
    return specs
