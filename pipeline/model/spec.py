"""Declarative description of a CTR model: kind, slots, the sparse tables it reads, dense shape.

A :class:`ModelSpec` is what ``deploy/models/*.yaml`` holds and what a trainer and a
snapshot record. It round-trips through plain dicts (``from_dict`` / ``to_dict``) and is
validated once, here, with errors naming the field. :meth:`ModelSpec.check` ties it to
the table catalog and to the sample stream's layout before any training starts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.codec.slots import SlotConfig
from pipeline.errors import ConfigError
from pipeline.ps.spec import SpecError, TableSpec

__all__ = ["DENSE_OPTIMIZERS", "MODEL_KINDS", "ModelSpec"]

MODEL_KINDS = ("lr", "wide_deep", "deepfm")
DENSE_OPTIMIZERS = ("adam", "adagrad", "sgd")
_REQUIRED = ("kind", "slots", "dense_dim")
_BAD_NAME_CHARS = "{}: \t\n/"


def _name(where: str, value: Any) -> str:
    """A table or model name: it ends up in Redis hash tags and file names."""
    if not isinstance(value, str) or not value or any(c in value for c in _BAD_NAME_CHARS):
        raise SpecError(
            where, f"must be a non-empty string without {{}}:/ or spaces; got {value!r}"
        )
    return value


def _int(where: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(where, f"expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise SpecError(where, f"must be in [{lo}, {hi}], got {value!r}")
    return value


def _float(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(where, f"expected a finite number, got {value!r}")
    return float(value)


def _names(where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise SpecError(where, f"expected a list of names, got {value!r}")
    return tuple(value)


def _short(names: Iterable[str], limit: int = 8) -> str:
    """``a, b, c`` (or the first ``limit`` names and a count) for error messages."""
    items = list(names)
    head = ", ".join(items[:limit])
    return head if len(items) <= limit else f"{head}, ... ({len(items)} in all)"


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A CTR model over ``slots`` and ``dense_dim`` dense features.

    ``lr`` reads only ``wide_table`` (dim 1); ``wide_deep`` and ``deepfm`` also read
    ``deep_table`` (dim ``deep_dim``), which ``lr`` ignores (stored as None).
    ``bias_init`` None means the trainer sets the output bias to logit(CTR) of its
    first batch. Dense parameters (bias, dense linear, MLP) live in the PS dense
    table :meth:`dense_table_name` and are trained by ``dense_optimizer``, except
    that with ``linear_lr`` set the bias and the dense linear weights get their own
    per-coordinate Adagrad at that rate (like the wide table's ids).
    """

    name: str = "ctr"
    kind: str
    slots: tuple[str, ...]
    dense_dim: int
    wide_table: str = "wide"
    deep_table: str | None = "deep"
    deep_dim: int = 16
    hidden: tuple[int, ...] = (128, 64)
    dense_optimizer: str = "adam"
    dense_lr: float = 1e-3
    bias_init: float | None = None
    dropout: float = 0.0
    linear_lr: float | None = None

    def __post_init__(self) -> None:
        _name("name", self.name)
        if self.kind not in MODEL_KINDS:
            raise SpecError("kind", f"must be one of {', '.join(MODEL_KINDS)}; got {self.kind!r}")
        slots = _names("slots", self.slots)
        if not slots:
            raise SpecError("slots", "must name at least one slot")
        for slot in slots:
            if not isinstance(slot, str) or not slot:
                raise SpecError("slots", f"every slot must be a non-empty string, got {slot!r}")
        duplicates = sorted({s for s in slots if slots.count(s) > 1})
        if duplicates:
            raise SpecError("slots", f"duplicate slot names: {', '.join(duplicates)}")
        object.__setattr__(self, "slots", slots)
        _int("dense_dim", self.dense_dim, 0, 1 << 20)
        _name("wide_table", self.wide_table)
        _int("deep_dim", self.deep_dim, 1, 4096)
        if self.kind == "lr":
            object.__setattr__(self, "deep_table", None)  # lr reads no deep table
        elif self.deep_table is None:
            raise SpecError("deep_table", f"required for kind {self.kind!r}")
        else:
            _name("deep_table", self.deep_table)
            if self.deep_table == self.wide_table:
                raise SpecError("deep_table", f"must differ from wide_table ({self.wide_table!r})")
        hidden = _names("hidden", self.hidden)
        for width in hidden:
            _int("hidden", width, 1, 1 << 16)
        object.__setattr__(self, "hidden", hidden)
        if self.dense_optimizer not in DENSE_OPTIMIZERS:
            raise SpecError(
                "dense_optimizer",
                f"must be one of {', '.join(DENSE_OPTIMIZERS)}; got {self.dense_optimizer!r}",
            )
        lr = _float("dense_lr", self.dense_lr)
        if lr <= 0:
            raise SpecError("dense_lr", f"must be > 0, got {self.dense_lr!r}")
        object.__setattr__(self, "dense_lr", lr)
        if self.bias_init is not None:
            object.__setattr__(self, "bias_init", _float("bias_init", self.bias_init))
        if self.linear_lr is not None:
            linear_lr = _float("linear_lr", self.linear_lr)
            if linear_lr <= 0:
                raise SpecError("linear_lr", f"must be > 0, got {self.linear_lr!r}")
            object.__setattr__(self, "linear_lr", linear_lr)
        dropout = _float("dropout", self.dropout)
        if not 0.0 <= dropout < 1.0:
            raise SpecError("dropout", f"must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", dropout)

    @classmethod
    def from_dict(cls, data: Any) -> ModelSpec:
        """Build from a plain mapping (parsed YAML/JSON); unknown keys are rejected by name."""
        if not isinstance(data, Mapping):
            raise SpecError("model", f"expected a mapping, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in set(data) - set(names))
        if unknown:
            raise SpecError(unknown[0], f"unknown field; allowed fields: {', '.join(names)}")
        for required in _REQUIRED:
            if required not in data:
                raise SpecError(required, "required field is missing")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: Path | str) -> ModelSpec:
        """Parse a model spec file; errors name the file and the field."""
        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"model spec {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"model spec {path}: malformed YAML: {exc}") from None
        try:
            return cls.from_dict(doc)
        except ConfigError as exc:
            raise ConfigError(f"model spec {path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-serializable dict; ``ModelSpec.from_dict(spec.to_dict()) == spec``."""
        out = asdict(self)
        out["slots"] = list(self.slots)
        out["hidden"] = list(self.hidden)
        return out

    @property
    def has_deep(self) -> bool:
        """Whether the model reads embeddings from a deep table (wide_deep, deepfm)."""
        return self.kind != "lr"

    def tables(self) -> dict[str, int]:
        """Sparse tables the model reads: name -> dim (wide 1, deep ``deep_dim``)."""
        out = {self.wide_table: 1}
        if self.deep_table is not None:
            out[self.deep_table] = self.deep_dim
        return out

    def dense_table_name(self) -> str:
        """Name of the PS dense table holding this model's dense parameters."""
        return f"model:{self.name}"

    def check(
        self,
        catalog: Mapping[str, TableSpec] | Iterable[TableSpec],
        stream: SlotConfig | None = None,
    ) -> None:
        """Raise ConfigError unless every table is in ``catalog`` with the right dim
        and (when given) the stream layout carries every slot and ``dense_dim`` features.

        ``catalog`` maps table name -> spec, or is the list :func:`load_catalog` returns.
        """
        specs = dict(catalog) if isinstance(catalog, Mapping) else {t.name: t for t in catalog}
        who = f"model spec {self.name!r}"
        for table, dim in self.tables().items():
            spec = specs.get(table)
            if spec is None:
                raise ConfigError(
                    f"{who} references table {table!r}, which no table spec defines "
                    f"(known: {_short(specs) or 'none'})"
                )
            if spec.dim != dim:
                field = "wide_table" if table == self.wide_table else "deep_dim"
                raise ConfigError(
                    f"{who} needs table {table!r} with dim {dim} ({field}), "
                    f"but its table spec has dim {spec.dim}"
                )
        if stream is None:
            return
        missing = [s for s in self.slots if s not in stream.slots]
        if missing:
            raise ConfigError(
                f"{who} reads slot {missing[0]!r}, which the stream layout does not carry "
                f"(stream slots: {_short(stream.slots) or 'none'})"
            )
        if stream.dense_dim != self.dense_dim:
            raise ConfigError(
                f"{who} expects dense_dim {self.dense_dim}, "
                f"but the stream carries {stream.dense_dim} dense features"
            )
