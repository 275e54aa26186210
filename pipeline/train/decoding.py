"""Decode one ``samples`` message for training, or say precisely why it cannot be used.

:func:`~pipeline.codec.samplebatch.decode_batch` already rejects malformed bytes,
empty batches, NaN/inf labels, weights and dense values, negative weights and a
layout whose fingerprint differs from the expected one; labels other than 0 or 1 and
negative or far-future event times are refused here (``bad_label``,
``bad_event_time``), before they reach the trainer. A fingerprint mismatch alone
does not say what differs, so the layout is compared here first and the dead letter
gets the specific reason: ``unknown_slot``, ``missing_slot``, ``slot_order`` or
``dense_dim_mismatch``. ``fingerprint_mismatch`` remains for a fingerprint that does
not match the batch's own layout (another hash version, corruption).
"""

from __future__ import annotations

from pipeline.codec.errors import CodecError
from pipeline.codec.samplebatch import SampleBatch, decode_batch
from pipeline.codec.slots import SlotConfig
from pipeline.codec.validation import validate_trainable

__all__ = ["TRAIN_REASONS", "check_layout", "decode_for_training"]

#: Reason codes this layer adds to ``pipeline.codec.errors.REASONS``.
TRAIN_REASONS: dict[str, str] = {
    "missing_slot": "the batch lacks a slot the expected SlotConfig has",
    "slot_order": "the batch has the expected slots in another order",
    "dense_dim_mismatch": "the batch's dense width differs from the expected one",
}


def decode_for_training(value: bytes | None, expected: SlotConfig) -> SampleBatch:
    """A validated SampleBatch with exactly the ``expected`` layout; CodecError otherwise.

    Its rows can be trained on: labels 0 or 1 and sane event times
    (:func:`~pipeline.codec.validation.validate_trainable`).
    """
    batch = decode_batch(value or b"")  # every check that needs no expected layout
    check_layout(batch, expected)
    validate_trainable(batch)
    return batch


def check_layout(batch: SampleBatch, expected: SlotConfig) -> None:
    """Raise CodecError naming the first way ``batch``'s layout differs from ``expected``."""
    if batch.fingerprint == expected.fingerprint:
        return
    unknown = [s for s in batch.slots if s not in expected.slots]
    if unknown:
        raise CodecError("unknown_slot", f"slots {unknown} are not in the expected config")
    missing = [s for s in expected.slots if s not in batch.slots]
    if missing:
        raise CodecError("missing_slot", f"the batch lacks the expected slots {missing}")
    if batch.slots != expected.slots:
        raise CodecError(
            "slot_order", f"slots {list(batch.slots)}, expected {list(expected.slots)}"
        )
    if batch.dense_dim != expected.dense_dim:
        raise CodecError(
            "dense_dim_mismatch",
            f"{batch.dense_dim} dense features, expected {expected.dense_dim}",
        )
    raise CodecError(  # same layout, other fingerprint: decode_batch let it through
        "fingerprint_mismatch",
        f"fingerprint {batch.fingerprint:#018x}, expected {expected.fingerprint:#018x}",
    )
