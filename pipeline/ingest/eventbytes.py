"""Avro bodies of the synthetic generator's events, built from precomputed pieces.

Encoding an ``Impression`` dict with fastavro costs about 15 us, building the dict
about 12 us more: at 20,000 events/s that is over half of a core, on a box that must
also run the broker and every role. But the generator's records are made of few
values: a request id, a user, an item (which fixes its category), a device, a
position and a time. A schemaless Avro body is the concatenation of its fields'
encodings, so each body is joined from byte strings computed once per entity
(``"u17"`` as an Avro string, the features-map entries of item 17 with its category,
...) plus the per-request and per-millisecond pieces, without a dict or a schema walk.

The bodies are byte-identical to ``avro.encode`` of the generator's records
(:meth:`~pipeline.ingest.generator.TrafficGenerator.impression_records` and
``click_records``); the constructor checks one of each against the schema in use and
raises :class:`EventBytesError` if the schema has changed under it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.codec import avro
from pipeline.errors import PipelineError
from pipeline.ingest.generator import SLOTS, EventBlock, TrafficGenerator

__all__ = ["EncodedEvents", "EventBytesError", "EventEncoder", "avro_long", "avro_string"]


class EventBytesError(PipelineError):
    """The precomputed encoding does not match the Avro schema in use."""


def avro_long(value: int) -> bytes:
    """Avro ``long``: zigzag, then a little-endian base-128 varint."""
    n = (value << 1) ^ (value >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def avro_string(text: str) -> bytes:
    """Avro ``string``: byte length as a long, then the UTF-8 bytes."""
    data = text.encode("utf-8")
    return avro_long(len(data)) + data


_LENGTHS = [avro_long(n) for n in range(1024)]  # string length prefixes, by length


@dataclass(frozen=True)
class EncodedEvents:
    """Message values and keys (the request id, as ``EventProducer`` keys them) of a
    block's impressions or clicks, in event-time order, with their event times."""

    values: list[bytes]
    keys: list[bytes]
    times: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.values)


def _pick(table: Sequence[bytes] | dict[int, bytes], index: list[int]) -> Sequence[bytes]:
    """``table[i] for i in index`` in one C call (itemgetter of one index is no tuple)."""
    if len(index) > 1:
        picked: tuple[bytes, ...] = itemgetter(*index)(table)
        return picked
    return [table[i] for i in index]


class EventEncoder:
    """Avro bodies of a :class:`TrafficGenerator`'s :class:`EventBlock` s.

    ``shift_ms`` moves every event time (the demo starts producing a little after the
    generator's ``start_time_ms``); the bodies then equal the records with
    ``event_time + shift_ms``.
    """

    def __init__(self, generator: TrafficGenerator) -> None:
        self.generator = generator
        c = generator.config
        k = c.items_per_request
        value = generator.raw_value
        self._user = [avro_string(value("user_id", u)) for u in range(c.num_users)]
        self._item = [avro_string(value("item_id", i)) for i in range(c.num_items)]
        key = {s: avro_string(s) for s in SLOTS}
        # the features map: one block of 5 entries (count 5 = zigzag 0x0a), in SLOTS
        # order, then the end-of-map 0 and the null branch (0) of "context"
        head = avro_long(len(SLOTS)) + key["user_id"]
        self._map_user = [head + u for u in self._user]
        category = generator.item_category.tolist()
        self._map_item = [
            key["item_id"] + self._item[i] + key["category"] + avro_string(value("category", cat))
            for i, cat in enumerate(category)
        ]
        self._positions = k + 1  # positions run 1..k: index device * (k + 1) + position
        self._map_tail = [
            key["device"]
            + avro_string(value("device", d))
            + key["position"]
            + avro_string(value("position", p))
            + b"\x00\x00"
            for d in range(len(c.devices))
            for p in range(self._positions)
        ]
        request_id = generator.request_id(0).encode("utf-8")
        if not request_id.endswith(b"0"):
            raise EventBytesError(
                f"request ids no longer end in the request number: {request_id!r}"
            )
        self._request_prefix = request_id[:-1]
        self._self_check()

    def _request_pieces(self, requests: Iterable[int]) -> tuple[list[bytes], list[bytes]]:
        """(Avro string, key bytes) of each request number (``TrafficGenerator.request_id``)."""
        prefix, lengths = self._request_prefix, _LENGTHS
        keys = [b"%s%d" % (prefix, r) for r in requests]
        return [lengths[len(key)] + key for key in keys], keys

    def impressions(self, block: EventBlock, shift_ms: int = 0) -> EncodedEvents:
        """The block's ``Impression`` bodies and keys, in block (event-time) order."""
        if not block.impressions:
            return EncodedEvents([], [], block.time)
        times = block.time + shift_ms if shift_ms else block.time
        first = int(block.request[0])
        strings, keys = self._request_pieces(range(first, int(block.request[-1]) + 1))
        req = (block.request - first).tolist()
        users, items = block.user.tolist(), block.item.tolist()
        tails = (block.device * self._positions + block.position).tolist()
        time_list = times.tolist()
        stamps = {t: avro_long(t) for t in set(time_list)}  # at most one per ms
        columns = (
            _pick(strings, req),
            _pick(self._user, users),
            _pick(self._item, items),
            _pick(stamps, time_list),
            _pick(self._map_user, users),
            _pick(self._map_item, items),
            _pick(self._map_tail, tails),
        )
        values = list(map(b"".join, zip(*columns, strict=True)))
        return EncodedEvents(values, list(_pick(keys, req)), times)

    def clicks(self, block: EventBlock, shift_ms: int = 0) -> EncodedEvents:
        """The block's ``Click`` bodies and keys, in event-time order."""
        if not block.clicks:
            return EncodedEvents([], [], block.click_time)
        times = block.click_time + shift_ms if shift_ms else block.click_time
        strings, keys = self._request_pieces(block.click_request.tolist())
        time_list = times.tolist()
        stamps = {t: avro_long(t) for t in set(time_list)}
        columns = (
            strings,
            _pick(self._user, block.click_user.tolist()),
            _pick(self._item, block.click_item.tolist()),
            _pick(stamps, time_list),
        )
        values = list(map(b"".join, zip(*columns, strict=True)))
        return EncodedEvents(values, keys, times)

    def _self_check(self) -> None:
        """One impression and one click against fastavro with the schemas in use."""
        gen = self.generator
        k = gen.config.items_per_request
        one = np.array([1], dtype=np.int64)
        probe = EventBlock(
            index=0,
            request=one * 7,
            user=one * (gen.config.num_users - 1),
            item=one * (gen.config.num_items - 1),
            device=one * (len(gen.config.devices) - 1),
            position=one * k,
            time=one * gen.config.start_time_ms,
            p=np.zeros(1),
            click_delay_ms=one,
            click_request=one * 7,
            click_user=one * 3,
            click_item=one * 5,
            click_time=one * (gen.config.start_time_ms + 1),
            late_clicks=0,
            duplicate_clicks=0,
            malformed=[],
        )
        pairs: list[tuple[str, bytes, dict[str, Any]]] = [
            ("Impression", self.impressions(probe).values[0], gen.impression_records(probe)[0]),
            ("Click", self.clicks(probe).values[0], gen.click_records(probe)[0]),
        ]
        for schema, body, record in pairs:
            if body != avro.encode(schema, record):
                raise EventBytesError(
                    f"the precomputed {schema} encoding differs from schemas/{schema}.avsc; "
                    "update pipeline/ingest/eventbytes.py to the schema"
                )
