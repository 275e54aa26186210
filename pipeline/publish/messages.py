"""Kafka messages of ``model.updates``: Avro chunk and manifest records with a type header.

Every message has the key ``<model>`` and headers ``type`` (``chunk`` or
``manifest``) and ``model``, so several models can share the topic and a reader
knows which schema to decode without trying both.
"""

from __future__ import annotations

from typing import Any

from pipeline.codec import avro

__all__ = ["CHUNK", "CHUNK_SCHEMA", "MANIFEST", "MANIFEST_SCHEMA", "header_map", "message"]

CHUNK_SCHEMA = "ModelUpdateChunk"
MANIFEST_SCHEMA = "ModelManifest"
CHUNK = b"chunk"
MANIFEST = b"manifest"


def message(model: str, kind: bytes, record: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``Producer.produce`` (minus ``topic``) of one record."""
    schema = CHUNK_SCHEMA if kind == CHUNK else MANIFEST_SCHEMA
    return {
        "key": model.encode(),
        "value": avro.encode(schema, record),
        "headers": [("type", kind), ("model", model.encode())],
    }


def header_map(headers: list[tuple[str, bytes]] | None) -> dict[str, bytes]:
    """Kafka headers as a dict (the last value of a repeated header wins)."""
    return {k: (v or b"") for k, v in (headers or [])}
