"""Shared hypothesis strategies for codec tests (and broker round-trip tests)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.codec.samplebatch import SampleBatch
from pipeline.codec.slots import SlotConfig

__all__ = ["finite_float32", "sample_batches", "slot_configs", "slot_names"]

finite_float32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


def slot_names() -> st.SearchStrategy[str]:
    """Non-empty slot names: any encodable Unicode except the 0x1F hash separator."""
    chars = st.characters(exclude_characters="\x1f", exclude_categories=["Cs"])
    return st.text(chars, min_size=1, max_size=8)


def slot_configs(max_slots: int = 4, max_dense_dim: int = 4) -> st.SearchStrategy[SlotConfig]:
    """SlotConfigs with 0..max_slots unique slots and 0..max_dense_dim dense features."""
    return st.builds(
        lambda slots, d: SlotConfig(tuple(slots), d),
        st.lists(slot_names(), max_size=max_slots, unique=True),
        st.integers(0, max_dense_dim),
    )


@st.composite
def _batches(
    draw: st.DrawFn,
    config: SlotConfig | None,
    max_rows: int,
    max_slots: int,
    max_ids_per_row: int,
    max_dense_dim: int,
) -> SampleBatch:
    """Build the arrays directly (not via from_rows) so codec tests stay independent."""
    cfg = config if config is not None else draw(slot_configs(max_slots, max_dense_dim))
    n = draw(st.integers(1, max_rows))
    num_slots, d = len(cfg.slots), cfg.dense_dim
    lengths = draw(hnp.arrays(np.int64, (num_slots, n), elements=st.integers(0, max_ids_per_row)))
    flat = np.concatenate([[0], np.cumsum(lengths.ravel())])
    offsets = (
        np.stack([flat[s * n : s * n + n + 1] for s in range(num_slots)])
        if num_slots
        else (np.zeros((0, n + 1), dtype=np.int64))
    )
    ids = draw(hnp.arrays(np.uint64, int(flat[-1])))  # full uint64 range, edges included
    return SampleBatch(
        labels=draw(hnp.arrays(np.float32, n, elements=finite_float32)),
        weights=draw(
            hnp.arrays(np.float32, n, elements=st.floats(0, 1e6, width=32, allow_subnormal=True))
        ),
        event_times=draw(hnp.arrays(np.int64, n)),
        slots=cfg.slots,
        offsets=offsets.astype(np.int32),
        ids=ids,
        dense=draw(hnp.arrays(np.float32, (n, d), elements=finite_float32)),
        fingerprint=cfg.fingerprint,
    )


def sample_batches(
    config: SlotConfig | None = None,
    *,
    max_rows: int = 16,
    max_slots: int = 4,
    max_ids_per_row: int = 4,
    max_dense_dim: int = 4,
) -> st.SearchStrategy[SampleBatch]:
    """Valid SampleBatches: N >= 1 rows, 0..k ids per row and slot, any uint64 ids.

    Pass ``config`` to fix the slots and dense width (e.g. for a topic round trip).
    """
    return _batches(config, max_rows, max_slots, max_ids_per_row, max_dense_dim)
