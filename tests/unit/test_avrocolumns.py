"""Bulk columnar Avro decoding (pipeline.codec.avrocolumns) against fastavro.

A record the bulk reader calls ``ok`` must decode with fastavro to exactly the
values it found; anything else it leaves to fastavro. Checked on generator traffic
and on thousands of corrupted bodies.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from pipeline.codec import avro
from pipeline.codec.avrocolumns import decode_columns, key_words, supports
from pipeline.codec.errors import CodecError
from pipeline.ingest.generator import TrafficGenerator

pytestmark = pytest.mark.unit


def _fastavro(name: str, data: bytes) -> dict[str, Any] | None:
    try:
        return avro.decode(name, data)
    except CodecError:
        return None


def _check(name: str, values: list[bytes]) -> np.ndarray:
    cols = decode_columns(name, values)
    for i, data in enumerate(values):
        rec = _fastavro(name, data)
        if not cols.ok[i]:
            continue
        assert rec is not None, f"bulk reader accepted {data!r}, fastavro did not"
        for field in ("request_id", "user_id", "item_id"):
            assert cols.text(cols.fields[field], i) == rec[field]
        assert int(cols.fields["event_time"][i]) == rec["event_time"]
        if name == "Impression":
            fmap = cols.fields["features"]
            entries = np.flatnonzero(fmap.record == i)
            got = {cols.text(fmap.key, j): cols.text(fmap.value, j) for j in entries}
            assert got == rec["features"]
            assert bool(cols.present["context"][i]) == (rec["context"] is not None)
            if rec["context"] is not None:
                ctx = cols.fields["context"]
                entries = np.flatnonzero(ctx.record == i)
                assert {cols.text(ctx.key, j): cols.text(ctx.value, j) for j in entries} == rec[
                    "context"
                ]
    return cols.ok


def test_generator_traffic_decodes_in_bulk_exactly() -> None:
    log = TrafficGenerator(seed=3).events(3000)
    imps = [avro.encode("Impression", r) for r in log.impressions]
    clicks = [avro.encode("Click", r) for r in log.clicks]
    assert _check("Impression", imps).all()
    assert _check("Click", clicks).all()


def test_corrupted_bodies_are_never_accepted_wrongly() -> None:
    rng = random.Random(0)
    log = TrafficGenerator(seed=4).events(2000)
    good = [avro.encode("Impression", r) for r in log.impressions]
    bad: list[bytes] = []
    for data in good:
        b = bytearray(data)
        how = rng.randrange(5)
        if how == 0:
            b = b[: rng.randrange(len(b))]
        elif how == 1:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif how == 2:
            b += bytes([rng.randrange(256)])
        elif how == 3:
            b.insert(rng.randrange(len(b)), rng.randrange(256))
        else:
            del b[rng.randrange(len(b))]
        bad.append(bytes(b))
    ok = _check("Impression", bad)
    accepted_by_fastavro = sum(_fastavro("Impression", d) is not None for d in bad)
    assert 0 < ok.sum() <= accepted_by_fastavro  # some survive; none wrongly


def test_what_the_bulk_reader_leaves_to_fastavro() -> None:
    base = {"request_id": "r", "user_id": "u", "item_id": "i", "event_time": 5}
    non_ascii = avro.encode("Impression", {**base, "features": {"city": "Zürich"}})
    with_context = avro.encode("Impression", {**base, "features": {}, "context": {"p": "1"}})
    empty = avro.encode("Impression", {**base, "features": {}})  # ends: map end, null context
    repeated = empty[:-2] + b"\x04\x02a\x02c\x02a\x02d\x00\x00"  # one block, key "a" twice
    assert avro.decode("Impression", repeated)["features"] == {"a": "d"}  # last wins
    values = [non_ascii, with_context, repeated, b"", b"\x00", non_ascii + b"\x00"]
    assert _check("Impression", values).tolist() == [False, True, False, False, False, False]


def test_key_words_identify_short_ranges_exactly() -> None:
    data = b"category\x1fdevicecategor"
    buf = np.frombuffer(data + bytes(64), dtype=np.uint8)
    w0, w1 = key_words(buf, np.array([0, 9, 15]), np.array([8, 6, 7]))
    assert w0[0] == int.from_bytes(b"category", "little") and w1[0] == 0
    assert w0[1] == int.from_bytes(b"device", "little")
    assert w0[2] == int.from_bytes(b"categor", "little")  # a prefix is not the name


def test_schemas_the_bulk_reader_supports() -> None:
    assert supports("Impression") and supports("Click") and supports("DeadLetter")
    assert not supports("SampleBatch") or supports("SampleBatch")  # any answer, no error
