"""The rules a SampleBatch must satisfy, each failure a CodecError with its reason.

Everything here is vectorized over the whole batch: the decode path of a consumer
runs these checks on every message. Reasons are listed in ``docs/codec.md``.

:func:`validate_batch` is the wire contract (any finite label, any int64 time);
:func:`validate_trainable` adds what training needs: labels 0 or 1 and event times
from 0 up to a day past now. Producers check both before sending, the trainer's
reader before a batch reaches the trainer (a failure becomes a dead letter).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from pipeline.codec.errors import CodecError
from pipeline.codec.slots import SlotConfig, config_fingerprint

if TYPE_CHECKING:
    from pipeline.codec.samplebatch import SampleBatch

__all__ = [
    "MAX_FUTURE_SKEW_MS",
    "check_event_time",
    "check_label",
    "now_ms",
    "validate_batch",
    "validate_trainable",
]

#: How far past the current time an event time may be: generous for clock skew and
#: time zone slips; beyond it the value is a unit error (microseconds, nanoseconds)
#: or garbage that would drag every watermark and window into the future.
MAX_FUTURE_SKEW_MS = 24 * 3600 * 1000


def validate_batch(batch: SampleBatch, expected: SlotConfig | None = None) -> None:
    """Raise CodecError unless ``batch`` is well-formed (and matches ``expected``)."""
    if not isinstance(batch.slots, tuple):
        raise CodecError("bad_slots", f"slots must be a tuple, got {type(batch.slots).__name__}")
    n = _check_shapes(batch)
    if n == 0:
        raise CodecError("empty_batch", "batch has no rows")
    try:
        SlotConfig(batch.slots, batch.dense_dim)
    except ValueError as exc:
        raise CodecError("bad_slots", str(exc)) from None
    _check_offsets(batch.offsets, len(batch.ids))
    _check_fingerprint(batch, expected)
    for name in ("labels", "weights", "dense"):
        if not np.isfinite(getattr(batch, name)).all():
            raise CodecError("non_finite", f"{name} contains NaN or infinity")
    if (batch.weights < 0).any():
        raise CodecError("negative_weight", "weights must be >= 0")


def validate_trainable(batch: SampleBatch, now: int | None = None) -> None:
    """Raise CodecError (``bad_label``, ``bad_event_time``) unless every row can be trained.

    ``batch`` must already pass :func:`validate_batch`. ``now`` is ms since the epoch
    (the current time by default).
    """
    labels = batch.labels
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        r = int(bad[0])
        raise CodecError(
            "bad_label",
            f"row {r}: label {float(labels[r]):g}, labels must be 0 or 1 "
            f"({bad.size} of {len(labels)} rows)",
        )
    times = batch.event_times
    latest = (now_ms() if now is None else now) + MAX_FUTURE_SKEW_MS
    bad = np.flatnonzero((times < 0) | (times > latest))
    if bad.size:
        r = int(bad[0])
        raise CodecError(
            "bad_event_time",
            f"row {r}: {_time_problem(int(times[r]), latest)} ({bad.size} of {len(times)} rows)",
        )


def check_label(label: float) -> None:
    """CodecError ``bad_label`` unless ``label`` is 0 or 1 (one row; producers)."""
    if label != 0 and label != 1:
        raise CodecError("bad_label", f"label {label:g}: labels must be 0 or 1")


def check_event_time(event_time: int, now: int | None = None) -> None:
    """CodecError ``bad_event_time`` unless 0 <= ``event_time`` <= now + a day (one row)."""
    latest = (now_ms() if now is None else now) + MAX_FUTURE_SKEW_MS
    if not 0 <= event_time <= latest:
        raise CodecError("bad_event_time", _time_problem(event_time, latest))


def now_ms() -> int:
    """The current time, ms since the Unix epoch."""
    return int(time.time() * 1000)


def _time_problem(event_time: int, latest: int) -> str:
    if event_time < 0:
        return f"event_time {event_time} is negative (ms since the Unix epoch expected)"
    return (
        f"event_time {event_time} is more than {MAX_FUTURE_SKEW_MS // 3_600_000} h past now "
        f"(latest allowed {latest}; ms since the Unix epoch expected, not us or ns)"
    )


_KINDS = {
    "labels": ("f", 4, 1),
    "weights": ("f", 4, 1),
    "event_times": ("i", 8, 1),
    "offsets": ("i", 4, 2),
    "ids": ("u", 8, 1),
    "dense": ("f", 4, 2),
}


def _check_shapes(batch: SampleBatch) -> int:
    """Check dtypes (``bad_dtype``) and shapes (``length_mismatch``); return N."""
    for name, (kind, size, ndim) in _KINDS.items():
        arr = getattr(batch, name)
        if not isinstance(arr, np.ndarray):
            raise CodecError("bad_dtype", f"{name}: expected a numpy array")
        if arr.dtype.kind != kind or arr.dtype.itemsize != size or arr.ndim != ndim:
            raise CodecError(
                "bad_dtype", f"{name}: {arr.dtype} with {arr.ndim} dims, expected {kind}{size}"
            )
    n = batch.labels.shape[0]
    shapes = {
        "weights": (n,),
        "event_times": (n,),
        "offsets": (len(batch.slots), n + 1),
        "dense": (n, batch.dense.shape[1]),
    }
    for name, shape in shapes.items():
        if getattr(batch, name).shape != shape:
            raise CodecError(
                "length_mismatch", f"{name}: shape {getattr(batch, name).shape}, expected {shape}"
            )
    return int(n)


def _check_offsets(offsets: npt.NDArray[np.int32], num_ids: int) -> None:
    """Offsets start at 0, end at len(ids), never decrease and chain slot to slot."""
    if offsets.shape[0] == 0:
        if num_ids:
            raise CodecError("offsets_out_of_bounds", f"{num_ids} ids but no slots")
        return
    if offsets[0, 0] != 0 or offsets[-1, -1] != num_ids:
        raise CodecError(
            "offsets_out_of_bounds",
            f"offsets span [{offsets[0, 0]}, {offsets[-1, -1]}], expected [0, {num_ids}]",
        )
    if (offsets[:, 1:] < offsets[:, :-1]).any():
        raise CodecError("offsets_not_monotonic", "offsets decrease inside a slot")
    if (offsets[1:, 0] != offsets[:-1, -1]).any():
        raise CodecError("offsets_not_contiguous", "a slot does not start where the last ended")


def _check_fingerprint(batch: SampleBatch, expected: SlotConfig | None) -> None:
    """The fingerprint matches the batch's own layout and, if given, the expected one."""
    fp = batch.fingerprint
    if not isinstance(fp, int) or fp != config_fingerprint(batch.slots, batch.dense_dim):
        raise CodecError("fingerprint_mismatch", f"{fp!r} does not match the batch layout")
    if expected is None or fp == expected.fingerprint:
        return
    for name in batch.slots:
        if name not in expected.slots:
            raise CodecError("unknown_slot", f"slot {name!r} is not in the expected config")
    raise CodecError(
        "fingerprint_mismatch",
        f"batch has slots={list(batch.slots)}, dense_dim={batch.dense_dim}; expected "
        f"slots={list(expected.slots)}, dense_dim={expected.dense_dim}",
    )
