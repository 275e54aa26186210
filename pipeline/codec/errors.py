"""The one exception type of the codec layer, with a stable machine-readable reason.

Consumers route a failed record to the dead-letter topic and record ``reason`` there,
so reason codes are part of the wire contract: add new ones, never rename old ones.
"""

from __future__ import annotations

__all__ = ["REASONS", "CodecError"]

#: Every reason code the codec layer raises, with what it means.
REASONS: dict[str, str] = {
    "avro_decode": "bytes are not a valid Avro record of the schema (or have trailing bytes)",
    "schema_mismatch": "a record to encode has unknown, missing or mistyped fields",
    "unknown_schema": "no schema file with that name",
    "unsupported_layout": "SampleBatch layout version this reader does not know",
    "empty_batch": "a SampleBatch with zero rows",
    "length_mismatch": "array byte lengths or shapes disagree with num_rows/slots/dense_dim",
    "bad_dtype": "an array has the wrong dtype or number of dimensions",
    "bad_slots": "slot names empty, duplicated or not strings",
    "bad_id": "a feature id outside the uint64 range",
    "offsets_out_of_bounds": "offsets do not start at 0 or do not end at len(ids)",
    "offsets_not_monotonic": "offsets decrease inside a slot row",
    "offsets_not_contiguous": "a slot's offsets do not start where the previous slot's end",
    "fingerprint_mismatch": "fingerprint differs from the batch layout or the expected one",
    "unknown_slot": "a slot the expected SlotConfig does not have",
    "non_finite": "NaN or infinity in labels, weights or dense features",
    "negative_weight": "a sample weight below zero",
    "bad_label": "a label other than 0 or 1 (a sample cannot be trained on)",
    "bad_event_time": "an event time below 0 or more than a day past the current time",
    "too_large": "a message above the topic's declared max.message.bytes",
    "decode_failed": "decoding raised something other than CodecError (a bug; see the log)",
}


class CodecError(ValueError):
    """A record could not be encoded, decoded or validated.

    ``reason`` is a short stable code (see :data:`REASONS`); ``message`` says what
    exactly was wrong. ``str(err)`` is ``"reason: message"``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[CodecError], tuple[str, str]]:
        # Keeps the exception picklable (multiprocessing readers) despite two args.
        return (type(self), (self.reason, self.message))
