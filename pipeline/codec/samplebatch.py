"""Columnar sample batches: N labelled samples as packed arrays in one Avro record.

Decoding is a handful of ``numpy.frombuffer`` calls plus vectorized checks, with no
per-row Python work; that is what lets one consumer core keep up with the topic.
The wire layout and validation rules are described in ``docs/codec.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.codec import avro
from pipeline.codec.errors import CodecError
from pipeline.codec.hashing import to_signed, to_signed_int, to_unsigned_int
from pipeline.codec.slots import SlotConfig
from pipeline.codec.validation import validate_batch

__all__ = [
    "LAYOUT_VERSION",
    "SampleBatch",
    "concat",
    "decode_batch",
    "encode_batch",
    "from_rows",
    "from_sample_records",
    "to_sample_records",
]

LAYOUT_VERSION = 1
_SCHEMA = "SampleBatch"
_MAX_IDS = np.iinfo(np.int32).max

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
SlotValues = Sequence[int] | npt.NDArray[np.integer[Any]] | int


@dataclass(frozen=True, eq=False, repr=False)
class SampleBatch:
    """N samples: labels, weights, event times, per-slot CSR ids and a dense matrix.

    ``offsets[s, r]`` is the GLOBAL position in ``ids`` where row ``r`` of slot ``s``
    starts; slot ``s`` spans ``ids[offsets[s, 0]:offsets[s, N]]``. Arrays decoded from
    the wire are read-only views of the message bytes.
    """

    labels: F32
    weights: F32
    event_times: I64
    slots: tuple[str, ...]
    offsets: I32
    ids: U64
    dense: F32
    fingerprint: int

    def __repr__(self) -> str:
        return (
            f"SampleBatch(num_rows={self.num_rows}, slots={self.slots!r}, "
            f"num_ids={len(self.ids)}, dense_dim={self.dense_dim}, "
            f"fingerprint={self.fingerprint:#018x})"
        )

    @property
    def num_rows(self) -> int:
        """N, the number of samples."""
        return int(self.labels.shape[0])

    @property
    def dense_dim(self) -> int:
        """D, dense features per sample."""
        return int(self.dense.shape[1])

    @property
    def config(self) -> SlotConfig:
        """The layout (slots, dense_dim) of this batch."""
        return SlotConfig(self.slots, self.dense_dim)

    def slot_ids(self, slot: str) -> tuple[I32, U64]:
        """``(row_offsets, ids)`` of one slot, row offsets starting at 0; ids is a view."""
        try:
            s = self.slots.index(slot)
        except ValueError:
            raise KeyError(slot) from None
        row = self.offsets[s]
        start, stop = int(row[0]), int(row[-1])
        local = row if start == 0 else (row - np.int32(start)).astype(np.int32)
        return local, self.ids[start:stop]

    def row_features(self, row: int) -> dict[str, U64]:
        """Ids of every slot for one row (for debugging and dead letters)."""
        return {
            name: self.ids[int(self.offsets[s, row]) : int(self.offsets[s, row + 1])]
            for s, name in enumerate(self.slots)
        }

    def slice(self, start: int, stop: int) -> SampleBatch:
        """Rows ``start:stop`` as a new batch (0 <= start < stop <= N)."""
        if not 0 <= start < stop <= self.num_rows:
            raise ValueError(f"slice({start}, {stop}) of a batch of {self.num_rows} rows")
        locals_: list[I64] = []
        pieces: list[U64] = []
        for s in range(len(self.slots)):
            row = self.offsets[s, start : stop + 1].astype(np.int64)
            locals_.append(row - row[0])
            pieces.append(self.ids[int(row[0]) : int(row[-1])])
        return SampleBatch(
            labels=self.labels[start:stop],
            weights=self.weights[start:stop],
            event_times=self.event_times[start:stop],
            slots=self.slots,
            offsets=_global_offsets(locals_, stop - start),
            ids=_concat_ids(pieces),
            dense=self.dense[start:stop],
            fingerprint=self.fingerprint,
        )

    def equals(self, other: SampleBatch) -> bool:
        """Bit-for-bit equality of every field (NaN-safe, -0.0 differs from 0.0)."""
        pairs: list[tuple[npt.NDArray[Any], npt.NDArray[Any], str]] = [
            (self.labels, other.labels, "<f4"),
            (self.weights, other.weights, "<f4"),
            (self.event_times, other.event_times, "<i8"),
            (self.offsets, other.offsets, "<i4"),
            (self.ids, other.ids, "<u8"),
            (self.dense, other.dense, "<f4"),
        ]
        return (
            self.slots == other.slots
            and self.fingerprint == other.fingerprint
            and all(a.shape == b.shape and _bytes(a, t) == _bytes(b, t) for a, b, t in pairs)
        )

    def validate(self, expected: SlotConfig | None = None) -> None:
        """Raise CodecError unless the batch is well-formed (and matches ``expected``)."""
        validate_batch(self, expected)


def encode_batch(batch: SampleBatch, *, validate: bool = True) -> bytes:
    """Avro SampleBatch body of ``batch`` (validated first unless told not to)."""
    if validate:
        batch.validate()
    record = {
        "layout_version": LAYOUT_VERSION,
        "fingerprint": to_signed_int(batch.fingerprint),
        "num_rows": batch.num_rows,
        "slots": list(batch.slots),
        "dense_dim": batch.dense_dim,
        "labels": _bytes(batch.labels, "<f4"),
        "weights": _bytes(batch.weights, "<f4"),
        "event_times": _bytes(batch.event_times, "<i8"),
        "offsets": _bytes(batch.offsets, "<i4"),
        "ids": _bytes(batch.ids, "<u8"),
        "dense": _bytes(batch.dense, "<f4"),
    }
    return avro.encode(_SCHEMA, record)


def decode_batch(data: bytes, expected: SlotConfig | None = None) -> SampleBatch:
    """SampleBatch from its Avro body; raises CodecError (only) on any defect."""
    rec = avro.decode(_SCHEMA, data)
    if rec["layout_version"] != LAYOUT_VERSION:
        raise CodecError("unsupported_layout", f"layout_version {rec['layout_version']}")
    n, d, slots = rec["num_rows"], rec["dense_dim"], tuple(rec["slots"])
    if n == 0:
        raise CodecError("empty_batch", "batch has no rows")
    if n < 0 or d < 0:
        raise CodecError("length_mismatch", f"num_rows={n}, dense_dim={d}")
    sizes = {
        "labels": 4 * n,
        "weights": 4 * n,
        "event_times": 8 * n,
        "offsets": 4 * len(slots) * (n + 1),
        "dense": 4 * n * d,
    }
    for field, size in sizes.items():
        if len(rec[field]) != size:
            raise CodecError(
                "length_mismatch", f"{field}: {len(rec[field])} bytes, expected {size}"
            )
    if len(rec["ids"]) % 8:
        raise CodecError("length_mismatch", f"ids: {len(rec['ids'])} bytes, not a multiple of 8")
    batch = SampleBatch(
        labels=np.frombuffer(rec["labels"], dtype="<f4"),
        weights=np.frombuffer(rec["weights"], dtype="<f4"),
        event_times=np.frombuffer(rec["event_times"], dtype="<i8"),
        slots=slots,
        offsets=np.frombuffer(rec["offsets"], dtype="<i4").reshape(len(slots), n + 1),
        ids=np.frombuffer(rec["ids"], dtype="<u8"),
        dense=np.frombuffer(rec["dense"], dtype="<f4").reshape(n, d),
        fingerprint=to_unsigned_int(rec["fingerprint"]),
    )
    batch.validate(expected)
    return batch


def from_rows(
    config: SlotConfig,
    labels: npt.ArrayLike,
    features: Sequence[Mapping[str, SlotValues]],
    event_times: npt.ArrayLike,
    *,
    weights: npt.ArrayLike | None = None,
    dense: npt.ArrayLike | None = None,
) -> SampleBatch:
    """Build a validated batch from per-row ``{slot: ids}`` (uint64 ids; an int = one id).

    Slots absent from a row have no ids in that row; a slot not in ``config`` raises
    CodecError ``unknown_slot``. Weights default to 1, dense to an (N, 0) matrix.
    """
    return _build(config, labels, features, event_times, weights, dense, signed=False)


def from_sample_records(config: SlotConfig, records: Sequence[Mapping[str, Any]]) -> SampleBatch:
    """Batch Avro ``Sample`` records (ids as two's-complement longs) row-wise producers send."""
    features = [{f["slot"]: f["ids"] for f in r["features"]} for r in records]
    dense = [r.get("dense", []) for r in records] if config.dense_dim else None
    return _build(
        config,
        [r["label"] for r in records],
        features,
        [r["event_time"] for r in records],
        [r.get("weight", 1.0) for r in records],
        dense,
        signed=True,
    )


def to_sample_records(batch: SampleBatch) -> list[dict[str, Any]]:
    """Row-wise Avro ``Sample`` records of a batch (every slot listed, even when empty)."""
    ids = to_signed(batch.ids).tolist()  # offsets are global, so slice this one list
    per_slot = [(name, batch.offsets[s].tolist()) for s, name in enumerate(batch.slots)]
    labels, weights = batch.labels.tolist(), batch.weights.tolist()
    times, dense = batch.event_times.tolist(), batch.dense.tolist()
    return [
        {
            "label": labels[r],
            "weight": weights[r],
            "event_time": times[r],
            "features": [{"slot": n, "ids": ids[off[r] : off[r + 1]]} for n, off in per_slot],
            "dense": dense[r],
        }
        for r in range(batch.num_rows)
    ]


def concat(batches: Sequence[SampleBatch]) -> SampleBatch:
    """Rows of several batches of the same layout, in order, as one batch."""
    if not batches:
        raise CodecError("empty_batch", "concat of no batches")
    first = batches[0]
    for b in batches[1:]:
        same = b.slots == first.slots and b.dense_dim == first.dense_dim
        if not same or b.fingerprint != first.fingerprint:
            raise CodecError("fingerprint_mismatch", "concat of batches with different layouts")
    if len(batches) == 1:
        return first
    locals_: list[I64] = []
    pieces: list[U64] = []
    for s in range(len(first.slots)):
        parts = [np.zeros(1, dtype=np.int64)]
        base = 0
        for b in batches:
            row = b.offsets[s].astype(np.int64)
            parts.append(row[1:] - row[0] + base)
            base += int(row[-1] - row[0])
            pieces.append(b.ids[int(row[0]) : int(row[-1])])
        locals_.append(np.concatenate(parts))
    n = sum(b.num_rows for b in batches)
    return SampleBatch(
        labels=np.concatenate([b.labels for b in batches]),
        weights=np.concatenate([b.weights for b in batches]),
        event_times=np.concatenate([b.event_times for b in batches]),
        slots=first.slots,
        offsets=_global_offsets(locals_, n),
        ids=_concat_ids(pieces),
        dense=np.concatenate([b.dense for b in batches]),
        fingerprint=first.fingerprint,
    )


def _build(
    config: SlotConfig,
    labels: npt.ArrayLike,
    features: Sequence[Mapping[str, SlotValues]],
    event_times: npt.ArrayLike,
    weights: npt.ArrayLike | None,
    dense: npt.ArrayLike | None,
    *,
    signed: bool,
) -> SampleBatch:
    """Shared row -> column assembly; ``signed`` reads ids as two's-complement int64."""
    n, num_slots = len(features), len(config.slots)
    index = {name: s for s, name in enumerate(config.slots)}
    flat: list[list[int]] = [[] for _ in range(num_slots)]
    lengths = [[0] * n for _ in range(num_slots)]
    for r, row in enumerate(features):
        for name, values in row.items():
            s = index.get(name)
            if s is None:
                raise CodecError("unknown_slot", f"row {r}: slot {name!r} not in the config")
            if isinstance(values, int | np.integer):
                flat[s].append(int(values))
                lengths[s][r] += 1
            else:
                flat[s].extend(values)
                lengths[s][r] += len(values)
    id_dtype = np.int64 if signed else np.uint64
    try:
        pieces = [np.array(ids, dtype=id_dtype).view(np.uint64) for ids in flat]
    except (OverflowError, ValueError, TypeError) as exc:
        raise CodecError("bad_id", f"ids must be {np.dtype(id_dtype)}: {exc}") from None
    cum = [np.concatenate([[0], np.cumsum(ls, dtype=np.int64)]) for ls in lengths]
    batch = SampleBatch(
        labels=_column("labels", labels, np.float32, (n,)),
        weights=_column("weights", np.ones(n) if weights is None else weights, np.float32, (n,)),
        event_times=_column("event_times", event_times, np.int64, (n,)),
        slots=config.slots,
        offsets=_global_offsets(cum, n),
        ids=_concat_ids(pieces),
        dense=_column(
            "dense", np.zeros((n, 0)) if dense is None else dense, np.float32, (n, config.dense_dim)
        ),
        fingerprint=config.fingerprint,
    )
    batch.validate(config)
    return batch


def _column(name: str, values: npt.ArrayLike, dtype: type[Any], shape: tuple[int, ...]) -> Any:
    """``values`` as an array of ``dtype`` and ``shape``, or CodecError naming the field."""
    try:
        arr = np.asarray(values, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise CodecError("bad_dtype", f"{name}: {exc}") from None
    if arr.shape != shape:
        raise CodecError("length_mismatch", f"{name}: shape {arr.shape}, expected {shape}")
    return arr


def _global_offsets(locals_: Sequence[I64], n: int) -> I32:
    """Stack per-slot offsets (each starting at 0, length n+1) into global int32 offsets."""
    if not locals_:
        return np.zeros((0, n + 1), dtype=np.int32)
    stacked = np.stack([np.asarray(loc, dtype=np.int64) for loc in locals_])
    starts = np.concatenate([[0], np.cumsum(stacked[:-1, -1])])
    stacked += starts[:, None]
    if stacked[-1, -1] > _MAX_IDS:
        raise CodecError("length_mismatch", f"{stacked[-1, -1]} ids exceed the int32 offsets")
    return stacked.astype(np.int32)


def _concat_ids(pieces: Iterable[U64]) -> U64:
    """One uint64 array from slot pieces (an empty array when there are none)."""
    parts = list(pieces)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def _bytes(arr: npt.NDArray[Any], dtype: str) -> bytes:
    """Packed C-order bytes of ``arr`` in the little-endian wire ``dtype``."""
    return arr.astype(dtype, copy=False).tobytes()
