"""One SampleBatch from row ranges of several: the batcher's slice-and-concat in one go.

``concat(b.slice(lo, hi) for ...)`` does a Python step per slot and per part, which
costs ~12 ms for a batch made of 64 small messages with 26 slots. Here the ids of
each part are gathered with one index array over all its slots, and the parts'
slot-major blocks are put in the output's slot-major order with one more gather, so
the Python work is a few numpy calls per part, none per slot. Long id ranges (big
messages) are copied as slices instead, which is faster than a gather for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.codec.errors import CodecError
from pipeline.codec.samplebatch import SampleBatch, concat

__all__ = ["Part", "assemble"]

#: Rows ``start:stop`` of a batch.
Part = tuple[SampleBatch, int, int]

_MAX_IDS = int(np.iinfo(np.int32).max)
_SLICE_MIN_IDS = 64  # mean range length from which slicing beats gathering (measured)
I64 = npt.NDArray[np.int64]


def assemble(parts: Sequence[Part]) -> SampleBatch:
    """Rows ``start:stop`` of each batch, in order, as one batch of their common layout."""
    if not parts:
        raise ValueError("assemble() of no parts")
    first = parts[0][0]
    for batch, start, stop in parts:
        if not 0 <= start < stop <= batch.num_rows:
            raise ValueError(f"rows {start}:{stop} of a batch of {batch.num_rows} rows")
        if batch.fingerprint != first.fingerprint or batch.slots != first.slots:
            raise CodecError("fingerprint_mismatch", "assemble() of batches with other layouts")
    num_slots = len(first.slots)
    if all(lo == 0 and hi == b.num_rows for b, lo, hi in parts) and (
        sum(len(b.ids) for b, _, _ in parts) >= _SLICE_MIN_IDS * num_slots * len(parts)
    ):
        return concat([b for b, _, _ in parts])  # big whole messages: slices, one per slot
    spans = [b.offsets[:, lo : hi + 1].astype(np.int64) for b, lo, hi in parts]  # S x (n+1)
    lengths = np.concatenate([np.diff(s, axis=1) for s in spans], axis=1)  # S x N ids per row
    n = sum(hi - lo for _, lo, hi in parts)
    offsets = np.zeros((num_slots, n + 1), dtype=np.int64)
    np.cumsum(lengths, axis=1, out=offsets[:, 1:])  # per slot, from 0
    offsets[1:] += np.cumsum(offsets[:-1, -1])[:, None]  # slots follow each other
    if num_slots and offsets[-1, -1] > _MAX_IDS:
        raise CodecError("length_mismatch", f"{offsets[-1, -1]} ids exceed the int32 offsets")

    def column(name: str) -> Any:
        return np.concatenate([getattr(b, name)[lo:hi] for b, lo, hi in parts])

    return SampleBatch(
        labels=column("labels"),
        weights=column("weights"),
        event_times=column("event_times"),
        slots=first.slots,
        offsets=offsets.astype(np.int32),
        ids=_ids(parts, spans),
        dense=column("dense"),
        fingerprint=first.fingerprint,
    )


def _ids(parts: Sequence[Part], spans: list[I64]) -> npt.NDArray[np.uint64]:
    """The parts' ids in slot-major order: slot 0 of every part, then slot 1, ...

    Long ranges (big messages) are copied as slices, one per (slot, part); many short
    ones are gathered: per part with one index over its slots, then the parts' blocks
    reordered slot-major with one more (fancy indexing costs per id, slicing per range).
    """
    starts = np.stack([s[:, 0] for s in spans])  # part x slot
    sizes = np.stack([s[:, -1] for s in spans]) - starts
    total = int(sizes.sum())
    if total >= _SLICE_MIN_IDS * sizes.size:
        ids = [b.ids for b, _, _ in parts]
        return np.concatenate(
            [
                ids[j][a : a + n]
                for j, a, n in zip(
                    np.tile(np.arange(len(parts)), sizes.shape[1]).tolist(),
                    starts.T.ravel().tolist(),
                    sizes.T.ravel().tolist(),
                    strict=True,
                )
            ]
            or [np.zeros(0, np.uint64)]
        )
    blocks = [b.ids[_ranges(starts[j], sizes[j])] for j, (b, _, _) in enumerate(parts)]
    joined = np.concatenate(blocks)  # part-major, slot-major inside each part
    where = (np.cumsum(sizes.ravel()) - sizes.ravel()).reshape(sizes.shape)  # block starts
    return joined[_ranges(where.T.ravel(), sizes.T.ravel())]


def _ranges(starts: I64, sizes: I64) -> I64:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, sizes)])``, vectorized."""
    total = int(sizes.sum())
    before = np.cumsum(sizes) - sizes
    return np.repeat(starts - before, sizes) + np.arange(total, dtype=np.int64)
