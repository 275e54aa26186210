"""Wire formats: Avro row records, columnar SampleBatch, and the stable feature hash."""

from __future__ import annotations

from pipeline.codec.errors import CodecError
from pipeline.codec.hashing import hash64, hash64_many
from pipeline.codec.samplebatch import SampleBatch, decode_batch, encode_batch, from_rows
from pipeline.codec.slots import SlotConfig

__all__ = [
    "CodecError",
    "SampleBatch",
    "SlotConfig",
    "decode_batch",
    "encode_batch",
    "from_rows",
    "hash64",
    "hash64_many",
]
