"""Bad input refused at the edges: training checks, size limits, truncated dead letters."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from pipeline.codec import avro
from pipeline.codec.errors import CodecError
from pipeline.codec.samplebatch import SampleBatch, decode_batch, encode_batch, from_rows
from pipeline.codec.slots import SlotConfig
from pipeline.codec.validation import (
    MAX_FUTURE_SKEW_MS,
    check_event_time,
    check_label,
    now_ms,
    validate_trainable,
)
from pipeline.config import KafkaSettings
from pipeline.ingest.dlq import PREFIX_BYTES, dead_letter_body, decode_dead_letter
from pipeline.ingest.limits import (
    BROKER_DEFAULT_MAX_MESSAGE_BYTES,
    FRAMING_BYTES,
    check_size,
    declared_limit,
    encode_within,
)
from pipeline.ingest.producer import EventProducer, SampleProducer
from pipeline.joiner.records import decode_click, decode_impression
from pipeline.train.decoding import decode_for_training

pytestmark = pytest.mark.unit

CONFIG = SlotConfig(("a", "b"), 1)
T = 1_700_000_000_000
NOWHERE = KafkaSettings(bootstrap="127.0.0.1:1")  # producers that never reach a broker


def _batch(n: int = 4, ids_per_row: int = 1) -> SampleBatch:
    rows = [{"a": list(range(r, r + ids_per_row)), "b": r} for r in range(n)]
    return from_rows(CONFIG, [r % 2 for r in range(n)], rows, [T + r for r in range(n)],
                     dense=[[0.5]] * n)  # fmt: skip


def _with(batch: SampleBatch, **arrays: object) -> SampleBatch:
    return dataclasses.replace(batch, **arrays)  # type: ignore[arg-type]


@pytest.mark.parametrize("label", [2.0, -1.0, 0.5])
def test_labels_other_than_0_and_1_cannot_be_trained(label: float) -> None:
    batch = _batch()
    labels = batch.labels.copy()
    labels[2] = label
    bad = _with(batch, labels=labels)
    bad.validate()  # the wire contract allows any finite label ...
    with pytest.raises(CodecError) as err:
        validate_trainable(bad)  # ... training does not
    assert err.value.reason == "bad_label" and "row 2" in err.value.message
    with pytest.raises(CodecError, match="bad_label"):
        decode_for_training(encode_batch(bad), CONFIG)
    with pytest.raises(CodecError, match="bad_label"):
        check_label(label)


@pytest.mark.parametrize("when", [-99, -1, "future"])
def test_negative_and_far_future_event_times_cannot_be_trained(when: int | str) -> None:
    now = now_ms()
    t = now + MAX_FUTURE_SKEW_MS + 60_000 if when == "future" else int(when)
    batch = _batch()
    times = batch.event_times.copy()
    times[1] = t
    with pytest.raises(CodecError) as err:
        validate_trainable(_with(batch, event_times=times), now)
    assert err.value.reason == "bad_event_time" and "row 1" in err.value.message
    with pytest.raises(CodecError, match="bad_event_time"):
        check_event_time(t, now)


def test_good_rows_pass_including_epoch_zero_and_a_day_ahead() -> None:
    now = now_ms()
    batch = _batch()
    times = np.array([0, T, now, now + MAX_FUTURE_SKEW_MS], dtype=np.int64)
    validate_trainable(_with(batch, event_times=times), now)
    assert decode_for_training(encode_batch(batch), CONFIG).num_rows == 4
    check_label(0.0)
    check_label(1)
    check_event_time(0, now)


def test_nan_dense_is_refused_by_the_codec() -> None:
    batch = _batch()
    dense = batch.dense.copy()
    dense[0, 0] = math.nan
    with pytest.raises(CodecError, match="non_finite"):
        encode_batch(_with(batch, dense=dense))


def test_sample_producer_refuses_bad_rows_at_the_call() -> None:
    with SampleProducer(NOWHERE, CONFIG, "t.samples", log_level=0) as producer:
        cases = {
            "bad_label": dict(label=2, event_time=T),
            "bad_event_time": dict(label=1, event_time=-99),
            "non_finite": dict(label=1, event_time=T, dense=[math.nan]),
        }
        for reason, kwargs in cases.items():
            kwargs.setdefault("dense", [0.0])
            with pytest.raises(CodecError) as err:
                producer.send(features={"a": 1}, **kwargs)  # type: ignore[arg-type]
            assert err.value.reason == reason
        bad = _batch()
        labels = bad.labels.copy()
        labels[0] = -1
        with pytest.raises(CodecError, match="bad_label"):
            producer.send_batch(_with(bad, labels=labels))
        assert producer.pending_rows == 0 and producer.stats.messages == 0


def test_sample_producer_refuses_a_row_that_cannot_fit_in_a_message() -> None:
    with SampleProducer(
        NOWHERE, CONFIG, "t.samples", max_message_bytes=64 << 10, log_level=0
    ) as producer:
        with pytest.raises(CodecError) as err:
            producer.send(1, {"a": list(range(10_000))}, T, dense=[0.0])
        assert err.value.reason == "too_large" and "t.samples" in err.value.message
        assert "65,536" in err.value.message
        assert producer.pending_rows == 0


def test_event_producer_refuses_bad_times_and_messages_above_the_limit() -> None:
    base = {"request_id": "r", "user_id": "u", "item_id": "i", "event_time": T, "features": {}}
    with EventProducer(NOWHERE, "t.events.impressions", "t.events.clicks", log_level=0) as producer:
        with pytest.raises(CodecError, match="bad_event_time"):
            producer.impression({**base, "event_time": -99})
        with pytest.raises(CodecError) as err:
            producer.impression({**base, "features": {"f": "x" * 2_000_000}})
        assert err.value.reason == "too_large"
        assert "t.events.impressions" in err.value.message and "1,048,588" in err.value.message
        assert producer.stats.messages == 0


def test_declared_limits_follow_the_topic_declarations_under_any_prefix() -> None:
    assert declared_limit("samples") == 8 << 20
    assert declared_limit("t1.samples") == 8 << 20
    assert declared_limit("t1.samples.dlq") == 8 << 20
    assert declared_limit("t1.model.updates") == 16 << 20
    assert declared_limit("t1.events.clicks") == BROKER_DEFAULT_MAX_MESSAGE_BYTES
    assert declared_limit("somebody-elses-topic") is None
    check_size("t", b"x" * 100, b"k", None)
    with pytest.raises(CodecError) as err:
        check_size("t.samples", b"x" * 1000, None, 1000)
    assert err.value.reason == "too_large"
    assert "1,000 bytes" in err.value.message and "t.samples" in err.value.message


def test_a_batch_above_the_limit_is_split_in_order_into_messages_that_fit() -> None:
    batch = _batch(200, ids_per_row=20)
    limit = 8 << 10
    parts = list(encode_within(batch, "t.samples", limit, b"key"))
    assert len(parts) > 1
    assert all(len(v) + 3 + FRAMING_BYTES <= limit for _, v in parts)
    rows = [decode_batch(v) for _, v in parts]
    assert sum(r.num_rows for r in rows) == 200
    assert np.concatenate([r.event_times for r in rows]).tolist() == batch.event_times.tolist()
    ((whole, value),) = encode_within(batch, "t.samples", None)
    assert whole is batch and decode_batch(value).equals(batch)
    with pytest.raises(CodecError, match="too_large"):
        list(encode_within(_batch(1, ids_per_row=2000), "t.samples", limit))


def test_a_dead_letter_too_large_to_keep_whole_keeps_a_prefix_and_the_size() -> None:
    origin = dict(
        key=b"k" * 5000,
        source_topic="t.samples",
        source_partition=3,
        source_offset=77,
        reason="avro_decode",
        error="bad bytes",
        failed_at=T,
    )
    small, key = dead_letter_body(b"tiny", max_bytes=1 << 20, **origin)  # type: ignore[arg-type]
    rec = decode_dead_letter(small)
    assert rec["value"] == b"tiny" and rec["original_size"] is None and key == origin["key"]
    huge = bytes(range(256)) * (20 * 4096)  # 20 MiB
    body, key = dead_letter_body(huge, max_bytes=8 << 20, **origin)  # type: ignore[arg-type]
    rec = decode_dead_letter(body)
    assert rec["value"] == huge[:PREFIX_BYTES] and rec["original_size"] == len(huge)
    assert rec["key"] == key == origin["key"][:PREFIX_BYTES]  # type: ignore[index]
    assert (rec["source_topic"], rec["source_partition"], rec["source_offset"]) == (
        "t.samples",
        3,
        77,
    )
    assert rec["reason"] == "avro_decode" and len(body) < 4096


def test_dead_letters_written_before_original_size_existed_still_read() -> None:
    record = {
        "value": b"v",
        "key": None,
        "source_topic": "s",
        "source_partition": 0,
        "source_offset": 1,
        "reason": "non_finite",
        "error": "e",
        "failed_at": T,
    }
    current = avro.encode("DeadLetter", record)
    legacy = current[:-1]  # the old layout: no trailing union index of original_size
    assert decode_dead_letter(legacy) == {**record, "original_size": None}
    assert decode_dead_letter(current) == {**record, "original_size": None}
    with pytest.raises(CodecError):
        decode_dead_letter(b"\xff\xff garbage")


def test_the_joiner_refuses_negative_and_far_future_event_times() -> None:
    base = {"request_id": "r", "user_id": "u", "item_id": "i", "event_time": T}
    future = now_ms() + 2 * MAX_FUTURE_SKEW_MS
    for when in (-99, future):
        with pytest.raises(CodecError, match="invalid_event"):
            decode_click(avro.encode("Click", {**base, "event_time": when}))
        with pytest.raises(CodecError, match="invalid_event"):
            decode_impression(
                avro.encode("Impression", {**base, "event_time": when, "features": {}})
            )


def test_the_joiner_bulk_path_dead_letters_far_future_events() -> None:
    from pipeline.joiner.events import decode_events
    from pipeline.joiner.logic import JoinConfig
    from pipeline.joiner.records import Origin

    base = {"request_id": "r", "user_id": "u", "item_id": "i", "event_time": T}
    future = now_ms() + 2 * MAX_FUTURE_SKEW_MS
    values = [
        avro.encode("Impression", {**base, "features": {}}),
        avro.encode("Impression", {**base, "event_time": future, "features": {}}),
        avro.encode("Click", {**base, "event_time": future}),
        avro.encode("Click", base),
    ]
    config = JoinConfig(slots=SlotConfig(("user_id", "item_id")), window_ms=1000)
    decoded = decode_events(
        config, [False, False, True, True], values, lambda i: Origin("c", 0, i, None, values[i])
    )
    assert [(r.index, r.reason) for r in decoded.rejected] == [
        (1, "invalid_event"),
        (2, "invalid_event"),
    ]
    assert decoded.index.tolist() == [0, 3]
