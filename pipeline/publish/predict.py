"""Online scoring with a :class:`~pipeline.publish.subscriber.LiveModel`: request rows in,
click probabilities out, computed exactly as the trainer's model computes them.

Raw feature values become ids with the training hash, ``hash64(slot, value)``
(:mod:`pipeline.codec.hashing`): a string is hashed as its UTF-8 bytes, an integer as
its decimal digits (``17`` and ``"17"`` are the same id), a list gives one id per
element (multi-valued slots), and ``null`` or an absent slot gives the row no id in that
slot. An empty string is a value like any other, as in the joiner and the row-wise
producer; for models trained from files (where the adapters give empty cells no id) its
id was never admitted and reads as a zero vector, so both conventions score the same.
Ids absent from the live model read as zero vectors, like unadmitted ids in training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import xxhash

from pipeline.codec.hashing import HASH_SEED, SEPARATOR, value_bytes
from pipeline.codec.samplebatch import SampleBatch, from_rows
from pipeline.codec.slots import SlotConfig
from pipeline.model.features import SparseInput, batch_ids
from pipeline.model.spec import ModelSpec
from pipeline.publish.subscriber import LiveModel

__all__ = ["RequestError", "parse_request", "parse_rows", "score"]

F32 = npt.NDArray[np.float32]

_ROW_KEYS = frozenset({"features", "dense"})


class RequestError(ValueError):
    """A predict request that cannot be scored; the message says which row and field."""


def parse_request(payload: Any, spec: ModelSpec, max_rows: int = 10_000) -> SampleBatch:
    """``{"rows": [...]}`` (decoded JSON) as a batch over ``spec``'s slots, or RequestError."""
    if not isinstance(payload, Mapping):
        raise RequestError(f'expected a JSON object {{"rows": [...]}}, got {_kind(payload)}')
    extra = set(payload) - {"rows"}
    if extra:
        raise RequestError(f"unknown request fields {sorted(extra)}; expected only 'rows'")
    rows = payload.get("rows")
    if not isinstance(rows, list) or not rows:
        raise RequestError(f"'rows' must be a non-empty list, got {_kind(rows)}")
    if len(rows) > max_rows:
        raise RequestError(f"{len(rows)} rows in one request; the limit is {max_rows}")
    return parse_rows(rows, spec)


def parse_rows(rows: Sequence[Any], spec: ModelSpec) -> SampleBatch:
    """Rows ``{"features": {slot: raw}, "dense": [...]}`` hashed into a SampleBatch."""
    # hash64(slot, v) with each slot's prefix encoded once (the per-value cost is most of
    # parsing: 26 slots per Criteo row)
    prefixes = {slot: slot.encode("utf-8") + SEPARATOR for slot in spec.slots}
    features: list[dict[str, list[int]]] = []
    dense = np.zeros((len(rows), spec.dense_dim), np.float32)
    for r, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise RequestError(f"row {r}: expected an object, got {_kind(row)}")
        extra = set(row) - _ROW_KEYS
        if extra:
            raise RequestError(f"row {r}: unknown fields {sorted(extra)}; expected features, dense")
        features.append(_hash_features(r, row.get("features", {}), prefixes, spec))
        dense[r] = _dense(r, row.get("dense"), spec.dense_dim)
    n = len(rows)
    config = SlotConfig(spec.slots, spec.dense_dim)
    return from_rows(config, np.zeros(n), features, np.zeros(n, np.int64), dense=dense)


def _hash_features(
    r: int, raw: Any, prefixes: Mapping[str, bytes], spec: ModelSpec
) -> dict[str, list[int]]:
    if not isinstance(raw, Mapping):
        raise RequestError(f"row {r}: 'features' must be an object, got {_kind(raw)}")
    out: dict[str, list[int]] = {}
    digest = xxhash.xxh64_intdigest
    for slot, value in raw.items():
        prefix = prefixes.get(slot)
        if prefix is None:
            raise RequestError(
                f"row {r}: unknown slot {slot!r}; model {spec.name!r} reads {', '.join(spec.slots)}"
            )
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        ids = []
        for v in values:
            if type(v) is str:  # the common case, without value_bytes' type dispatch
                ids.append(digest(prefix + v.encode("utf-8"), HASH_SEED))
            elif isinstance(v, int) and not isinstance(v, bool):
                ids.append(digest(prefix + value_bytes(v), HASH_SEED))
            else:
                raise RequestError(
                    f"row {r}: slot {slot!r}: expected a string, an integer or a list of "
                    f"them, got {_kind(v)} {v!r}"
                )
        out[slot] = ids
    return out


def _dense(r: int, raw: Any, width: int) -> list[float]:
    if raw is None:
        if width:
            raise RequestError(f"row {r}: 'dense' is required: {width} numbers")
        return []
    if not isinstance(raw, list) or len(raw) != width:
        got = f"{len(raw)} values" if isinstance(raw, list) else _kind(raw)
        raise RequestError(f"row {r}: 'dense' must be a list of {width} numbers, got {got}")
    for v in raw:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise RequestError(f"row {r}: 'dense' values must be finite numbers, got {v!r}")
    return [float(v) for v in raw]


def _kind(value: Any) -> str:
    """A JSON-ish name of ``value``'s type, for error messages."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    if isinstance(value, Mapping):
        return "object"
    return names.get(type(value), "number" if isinstance(value, int | float) else "value")


@torch.no_grad()
def score(live: LiveModel, spec: ModelSpec, batch: SampleBatch) -> F32:
    """Click probabilities of ``batch`` under ``live`` (the computation of ``Inferencer.score``
    with the live model's rows in place of the PS pull view)."""
    ids = batch_ids(batch, spec.slots)
    index = torch.from_numpy(ids.index)
    offsets = torch.from_numpy(ids.offsets)
    inputs = {}
    for table in spec.tables():
        _found, weights = live.lookup(table, ids.unique)
        leaf = torch.from_numpy(weights)
        inputs[table] = SparseInput(leaf, index, offsets, ids.num_rows, ids.num_slots)
    dense = torch.from_numpy(np.require(batch.dense, np.float32, ["W"]))
    out: F32 = torch.sigmoid(live.module(inputs, dense)).numpy()
    return out
