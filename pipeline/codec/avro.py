"""Row-wise Avro records: load ``schemas/*.avsc`` and encode/decode schemaless bodies.

Schemas are read lazily from ``$PIPELINE_SCHEMAS_DIR`` or ``<repo root>/schemas`` and
cached (per folder, so changing the variable takes effect). Logical types
(``timestamp-millis``) are stripped before parsing: they do not change the binary
encoding, and this way times stay plain int milliseconds on both sides instead of
turning into ``datetime`` objects on decode. Bulk decoding of many bodies at once,
into columns, is in :mod:`pipeline.codec.avrocolumns`.
"""

from __future__ import annotations

import copy
import io
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import fastavro

from pipeline.codec.errors import CodecError

__all__ = ["decode", "encode", "load_schema", "parsed_schema", "schema_names", "schemas_dir"]

SCHEMAS_DIR_ENV = "PIPELINE_SCHEMAS_DIR"


def schemas_dir() -> Path:
    """Folder holding the ``.avsc`` files (env ``PIPELINE_SCHEMAS_DIR`` wins)."""
    env = os.environ.get(SCHEMAS_DIR_ENV)
    return Path(env) if env else _default_dir()


@lru_cache(maxsize=1)
def _default_dir() -> Path:
    # resolve() touches the filesystem: once per process, not once per record.
    return Path(__file__).resolve().parents[2] / "schemas"


def schema_names() -> list[str]:
    """Names of all schemas (file stems), sorted."""
    return sorted(p.stem for p in schemas_dir().glob("*.avsc"))


def load_schema(name: str) -> dict[str, Any]:
    """The schema ``name`` as written in its file (a fresh copy, safe to mutate)."""
    return copy.deepcopy(_raw_schema(str(schemas_dir()), name))


def parsed_schema(name: str) -> dict[str, Any]:
    """The fastavro-parsed schema (logical types stripped), for direct fastavro calls."""
    # Called once per record by encode/decode: a dict lookup keyed by the env value,
    # instead of building the folder path (Path, resolve, str) every time.
    key = (os.environ.get(SCHEMAS_DIR_ENV), name)
    schema = _BY_ENV.get(key)
    if schema is None:
        schema = _BY_ENV[key] = _parsed_schema(str(schemas_dir()), name)
    return schema


_BY_ENV: dict[tuple[str | None, str], dict[str, Any]] = {}


def encode(name: str, record: dict[str, Any]) -> bytes:
    """Schemaless Avro body of ``record``; unknown/missing/mistyped fields raise."""
    schema = parsed_schema(name)
    if not isinstance(record, dict):
        raise CodecError("schema_mismatch", f"{name}: record must be a dict")
    fields = schema["fields"]
    known = {f["name"] for f in fields}
    for key in record:
        if key not in known:
            raise CodecError("schema_mismatch", f"{name}: unknown field {key!r}")
    for field in fields:
        if field["name"] not in record and "default" not in field:
            raise CodecError("schema_mismatch", f"{name}: missing field {field['name']!r}")
    buf = io.BytesIO()
    try:
        fastavro.schemaless_writer(buf, schema, record, strict_allow_default=True)
    except (ValueError, TypeError, OverflowError, AttributeError, KeyError) as exc:
        # fastavro's messages name the nested field ("... on field ids").
        raise CodecError("schema_mismatch", f"{name}: {exc}") from exc
    return buf.getvalue()


def decode(name: str, data: bytes) -> dict[str, Any]:
    """Record from a schemaless Avro body; any malformed input raises CodecError."""
    schema = parsed_schema(name)
    buf = io.BytesIO(data)
    try:
        record = fastavro.schemaless_reader(buf, schema, None)
    except Exception as exc:  # untrusted bytes: fastavro raises many types
        raise CodecError("avro_decode", f"{name}: {type(exc).__name__}: {exc}") from exc
    if buf.tell() != len(data):
        raise CodecError("avro_decode", f"{name}: {len(data) - buf.tell()} trailing bytes")
    if not isinstance(record, dict):
        raise CodecError("avro_decode", f"{name}: not a record")
    return record


@lru_cache(maxsize=64)
def _raw_schema(folder: str, name: str) -> dict[str, Any]:
    """Parsed JSON of ``<folder>/<name>.avsc`` (cached per folder)."""
    path = Path(folder) / f"{name}.avsc"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CodecError("unknown_schema", f"no schema {name!r} in {folder}") from None
    schema = json.loads(text)
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise CodecError("unknown_schema", f"{path} is not an Avro record schema")
    return schema


@lru_cache(maxsize=64)
def _parsed_schema(folder: str, name: str) -> dict[str, Any]:
    """fastavro-parsed schema without logical types (same bytes, int times)."""
    plain = _strip_logical_types(_raw_schema(folder, name))
    parsed = fastavro.parse_schema(plain, named_schemas={})
    if not isinstance(parsed, dict):
        raise CodecError("unknown_schema", f"{name} did not parse to a record schema")
    return parsed


def _strip_logical_types(node: Any) -> Any:
    """Copy of a schema tree with every ``logicalType`` annotation removed."""
    if isinstance(node, dict):
        return {k: _strip_logical_types(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [_strip_logical_types(v) for v in node]
    return node
