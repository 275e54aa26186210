"""Declarative description of one sparse table: dim, initializer, optimizer, accessor, serving.

A :class:`TableSpec` is what a model config names per table and what a snapshot's
``meta.json`` records, so it round-trips through plain dicts (``from_dict`` /
``to_dict``). Feature ids are uint64 hashes; a table has no vocabulary size.
Validation happens here, once, with errors naming the field and allowed values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from pipeline.errors import ConfigError

__all__ = [
    "INITIALIZER_KINDS",
    "OPTIMIZER_KINDS",
    "AccessorSpec",
    "InitializerSpec",
    "OptimizerSpec",
    "ServingSpec",
    "SpecError",
    "TableSpec",
]

OPTIMIZER_KINDS = ("sgd", "adagrad", "adam", "ftrl")
INITIALIZER_KINDS = ("zeros", "uniform", "normal")
_U64_MAX = 2**64 - 1


class SpecError(ConfigError, ValueError):
    """A table spec field is invalid; ``field`` is its dotted path (e.g. ``optimizer.lr``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _number(
    where: str,
    value: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """Validate a finite real number within optional (open or closed) bounds."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(where, f"expected a number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise SpecError(where, f"expected a finite number, got {value!r}")
    if lo is not None and (x <= lo if lo_open else x < lo):
        raise SpecError(where, f"must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (x >= hi if hi_open else x > hi):
        raise SpecError(where, f"must be {'<' if hi_open else '<='} {hi}, got {value!r}")
    return x


def _real(obj: object, where: str, **bounds: Any) -> None:
    """Validate ``obj.<attr>`` (``where`` = "section.attr") and store it as a float."""
    attr = where.rsplit(".", 1)[-1]
    object.__setattr__(obj, attr, _number(where, getattr(obj, attr), **bounds))


def _integer(where: str, value: Any, *, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(where, f"expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise SpecError(where, f"must be in [{lo}, {hi}], got {value!r}")
    return value


def _choice(where: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise SpecError(where, f"must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)


_T = TypeVar("_T")


def _build(cls: type[_T], data: Any, where: str) -> _T:
    """Construct a spec dataclass from a mapping, rejecting unknown keys by name."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise SpecError(where or cls.__name__, f"expected a mapping, got {type(data).__name__}")
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise SpecError(
            f"{where}.{unknown[0]}" if where else unknown[0],
            f"unknown field; allowed fields: {', '.join(names)}",
        )
    return cls(**data)


@dataclass(frozen=True)
class OptimizerSpec:
    """Sparse optimizer and its hyperparameters (unused ones are ignored by the kind).

    ``lr`` drives sgd/adagrad/adam; FTRL uses ``ftrl_alpha`` (its learning rate),
    ``ftrl_beta``, ``l1`` and ``l2``. ``weight_clip`` bounds weights to [-c, c].
    """

    kind: str = "adagrad"
    lr: float = 0.05
    eps: float = 1e-8
    initial_accumulator: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    ftrl_alpha: float = 0.05
    ftrl_beta: float = 1.0
    l1: float = 0.0
    l2: float = 0.0
    weight_clip: float | None = None

    def __post_init__(self) -> None:
        _choice("optimizer.kind", self.kind, OPTIMIZER_KINDS)
        _real(self, "optimizer.lr", lo=0.0, lo_open=True)
        _real(self, "optimizer.eps", lo=0.0, lo_open=True)
        _real(self, "optimizer.initial_accumulator", lo=0.0)
        _real(self, "optimizer.beta1", lo=0.0, hi=1.0, hi_open=True)
        _real(self, "optimizer.beta2", lo=0.0, hi=1.0, hi_open=True)
        _real(self, "optimizer.ftrl_alpha", lo=0.0, lo_open=True)
        _real(self, "optimizer.ftrl_beta", lo=0.0)
        _real(self, "optimizer.l1", lo=0.0)
        _real(self, "optimizer.l2", lo=0.0)
        if self.weight_clip is not None:
            _real(self, "optimizer.weight_clip", lo=0.0, lo_open=True)

    @classmethod
    def from_dict(cls, data: Any) -> OptimizerSpec:
        return _build(cls, data, "optimizer")


@dataclass(frozen=True)
class InitializerSpec:
    """Initial value of a newly admitted embedding: zeros, uniform(-scale, scale) or normal(0, std).

    Values are derived from ``hash(id, seed)`` so every shard layout and restart agrees.
    """

    kind: str = "uniform"
    scale: float = 0.01
    std: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("initializer.kind", self.kind, INITIALIZER_KINDS)
        _real(self, "initializer.scale", lo=0.0)
        _real(self, "initializer.std", lo=0.0)
        _integer("initializer.seed", self.seed, lo=0, hi=_U64_MAX)

    @classmethod
    def from_dict(cls, data: Any) -> InitializerSpec:
        return _build(cls, data, "initializer")


@dataclass(frozen=True)
class AccessorSpec:
    """CTR admission and eviction rules (Paddle ``CtrCommonAccessor`` semantics and defaults).

    score = (show - click) * nonclk_coeff + click * clk_coeff. A row gets an embedding
    once score >= admit_threshold (and its per-id coin < admit_probability); shrink
    decays show/click by show_click_decay_rate and deletes rows whose score falls
    below delete_threshold or that were unseen for more than delete_after_unseen_days.
    """

    nonclk_coeff: float = 0.1
    clk_coeff: float = 1.0
    admit_threshold: float = 1.5
    admit_probability: float = 1.0
    show_click_decay_rate: float = 0.98
    delete_threshold: float = 0.8
    delete_after_unseen_days: float = 30.0

    def __post_init__(self) -> None:
        _real(self, "accessor.nonclk_coeff", lo=0.0)
        _real(self, "accessor.clk_coeff", lo=0.0)
        _real(self, "accessor.admit_threshold", lo=0.0)
        _real(self, "accessor.admit_probability", lo=0.0, hi=1.0)
        _real(self, "accessor.show_click_decay_rate", lo=0.0, hi=1.0, lo_open=True)
        _real(self, "accessor.delete_threshold", lo=0.0)
        _real(self, "accessor.delete_after_unseen_days", lo=0.0, lo_open=True)

    @classmethod
    def from_dict(cls, data: Any) -> AccessorSpec:
        return _build(cls, data, "accessor")


@dataclass(frozen=True)
class ServingSpec:
    """Which rows are published for serving (admitted and score >= min_score) and how (fp16)."""

    min_score: float = 0.0
    fp16: bool = False

    def __post_init__(self) -> None:
        _real(self, "serving.min_score", lo=0.0)
        if not isinstance(self.fp16, bool):
            raise SpecError("serving.fp16", f"must be true or false; got {self.fp16!r}")

    @classmethod
    def from_dict(cls, data: Any) -> ServingSpec:
        return _build(cls, data, "serving")


@dataclass(frozen=True)
class TableSpec:
    """One sparse table: uint64 id -> float32[dim] embedding plus optimizer state and stats."""

    name: str
    dim: int
    initializer: InitializerSpec = field(default_factory=InitializerSpec)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    accessor: AccessorSpec = field(default_factory=AccessorSpec)
    serving: ServingSpec = field(default_factory=ServingSpec)

    def __post_init__(self) -> None:
        if (
            not isinstance(self.name, str)
            or not self.name
            or any(c in self.name for c in "{}: \t\n/")
        ):
            # The name ends up in Redis hash tags {table:shard} and file names.
            raise SpecError(
                "name", f"must be a non-empty string without {{}}:/ or spaces; got {self.name!r}"
            )
        _integer("dim", self.dim, lo=1, hi=4096)
        for name, cls in (
            ("initializer", InitializerSpec),
            ("optimizer", OptimizerSpec),
            ("accessor", AccessorSpec),
            ("serving", ServingSpec),
        ):
            value = getattr(self, name)
            if not isinstance(value, cls):
                # Accept nested mappings so TableSpec(name=..., optimizer={...}) works.
                object.__setattr__(self, name, _build(cls, value, name))

    @classmethod
    def from_dict(cls, data: Any) -> TableSpec:
        """Build from a plain mapping (e.g. parsed YAML/JSON); nested sections are optional."""
        if not isinstance(data, Mapping):
            raise SpecError("table", f"expected a mapping, got {type(data).__name__}")
        for required in ("name", "dim"):
            if required not in data:
                raise SpecError(required, "required field is missing")
        return _build(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable dict; ``TableSpec.from_dict(spec.to_dict()) == spec``."""
        return asdict(self)
