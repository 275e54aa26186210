"""Bulk decoding and hashing of polled messages (pipeline.joiner.events).

Every event the bulk path produces must carry exactly what the one-record-at-a-time
path (``decode_impression`` + ``impression_batch``, with ``xxhash`` and fastavro)
gives; bad messages are rejected with the codec's reason.
"""

from __future__ import annotations

import random

import pytest

from pipeline.codec import avro
from pipeline.codec.slots import SlotConfig
from pipeline.ingest.generator import TrafficGenerator
from pipeline.joiner.events import decode_events
from pipeline.joiner.logic import JoinConfig, click_batch, impression_batch
from pipeline.joiner.records import Origin, decode_click, decode_impression

pytestmark = pytest.mark.unit

# slots from the map, from the record fields, and one no impression has
SLOTS = SlotConfig(("user_id", "item_id", "category", "device", "position", "absent"))


def _messages() -> tuple[list[bool], list[bytes]]:
    log = TrafficGenerator(seed=11).events(3000)
    msgs = [(False, avro.encode("Impression", r)) for r in log.impressions]
    msgs += [(True, avro.encode("Click", r)) for r in log.clicks]
    random.Random(1).shuffle(msgs)
    base = {"request_id": "x", "user_id": "u9", "item_id": "i9", "event_time": 5}
    msgs += [
        (False, b"garbage"),
        (True, b"\x00"),
        (False, avro.encode("Impression", {**base, "request_id": "é", "features": {"zz": "1"}})),
        (False, avro.encode("Impression", {**base, "user_id": "", "features": {}})),
        (False, avro.encode("Impression", {**base, "features": {"item_id": "other", "x": "y"}})),
        (True, avro.encode("Click", {**base, "event_time": -1})),
        (True, avro.encode("Click", {**base, "item_id": "ü"})),
    ]
    return [m[0] for m in msgs], [m[1] for m in msgs]


@pytest.mark.parametrize("rate", [1.0, 0.3])
def test_bulk_events_equal_the_record_by_record_path(rate: float) -> None:
    config = JoinConfig(slots=SLOTS, window_ms=1000, negative_rate=rate)
    flags, values = _messages()

    def origin(i: int) -> Origin:
        return Origin("events.clicks", 0, i, None, values[i])

    decoded = decode_events(config, flags, values, origin)
    n = len(values)
    assert sorted(r.index for r in decoded.rejected) == [n - 7, n - 6, n - 4, n - 2]
    assert {r.reason for r in decoded.rejected} == {"avro_decode", "invalid_event"}
    assert decoded.index.tolist() == sorted(set(range(n)) - {r.index for r in decoded.rejected})
    e = decoded.events
    for j, i in enumerate(decoded.index.tolist()):
        if flags[i]:
            ref = click_batch([decode_click(values[i])], [origin(i)])
        else:
            ref = impression_batch([decode_impression(values[i])], config)
        assert (e.click[j], e.time[j], e.key[j]) == (ref.click[0], ref.time[0], ref.key[0])
        if flags[i]:
            assert e.orphan(j).click == ref.orphan(0).click
            assert e.orphan(j).origin.offset == i
            continue
        assert (e.user[j], e.keep[j], e.unknown[j]) == (ref.user[0], ref.keep[0], ref.unknown[0])
        assert e.present[j].tolist() == ref.present[0].tolist()
        assert e.ids[j][e.present[j]].tolist() == ref.ids[0][ref.present[0]].tolist()
    assert not e.present[:, SLOTS.slots.index("absent")].any()
    if rate < 1:
        imps = ~e.click
        assert 0.2 < e.keep[imps].mean() < 0.4
