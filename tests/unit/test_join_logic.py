"""The joiner without Kafka: join decisions, watermarks, dedup, state, batching, dead letters."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import xxhash
from click.testing import CliRunner

from pipeline.codec import avro
from pipeline.codec.errors import CodecError
from pipeline.codec.hashing import hash64
from pipeline.codec.samplebatch import decode_batch
from pipeline.codec.slots import SlotConfig
from pipeline.joiner import delta
from pipeline.joiner.engine import JoinEngine, Topics
from pipeline.joiner.logic import (
    Counters,
    JoinConfig,
    Joined,
    Kind,
    OrphanClick,
    Output,
    PartitionJoiner,
    Samples,
    click_batch,
    join_key_hash,
    keep_negative,
)
from pipeline.joiner.output import HEADER_SOURCE, SampleBatcher, parse_headers
from pipeline.joiner.records import Click, Impression, Origin, decode_click, decode_impression
from pipeline.joiner.settings import JoinerSettings

pytestmark = pytest.mark.unit

SLOTS = SlotConfig(("user_id", "item_id", "city"))
NOW = 1_000_000  # wall clock, ms


def cfg(**kw: Any) -> JoinConfig:
    base: dict[str, Any] = {"slots": SLOTS, "window_ms": 100, "lateness_ms": 10, "idle_ms": 10**9}
    return JoinConfig(**{**base, **kw})


NAMES: dict[int, tuple[str, str]] = {}  # join key hash -> (request id, item id)


def imp(rid: str, t: int, item: str = "i1", user: str = "u1", **features: str) -> Impression:
    NAMES[join_key_hash((rid, item))] = (rid, item)
    return Impression(rid, user, item, t, features or {"city": "paris"})


def clk(rid: str, t: int, item: str = "i1", user: str = "u1") -> Click:
    NAMES[join_key_hash((rid, item))] = (rid, item)
    return Click(rid, user, item, t)


def key_of(s: Joined) -> tuple[str, str]:
    return NAMES[s.key_hash]


def origin(offset: int = 0) -> Origin:
    return Origin("events.clicks", 0, offset, b"k", b"raw-bytes")


def samples(out: list[Output]) -> list[Joined]:
    return [o for o in out if isinstance(o, Joined)]


def kinds(out: list[Output]) -> list[tuple[str, Kind]]:
    return [(key_of(s)[0], s.kind) for s in samples(out)]


def push_time(j: PartitionJoiner, t: int, now: int = NOW) -> list[Output]:
    """Advance both streams to event time ``t`` with a joined filler pair (left out)."""
    out = j.impression(imp(f"filler-{t}", t, item="other"), now)
    out += j.click(clk(f"filler-{t}", t, item="other"), origin(), now)
    return [o for o in out if not (isinstance(o, Joined) and key_of(o)[0].startswith("filler"))]


# -- join decisions -----------------------------------------------------------------------


def test_click_in_window_emits_positive_at_once_with_hashed_features() -> None:
    j = PartitionJoiner(cfg(), NOW)
    assert j.impression(imp("r1", 1000, city="rome"), NOW) == []
    out = j.click(clk("r1", 1100), origin(), NOW)  # at the window's inclusive end
    [s] = samples(out)
    assert (s.kind, s.label, s.weight, s.event_time) == (Kind.POSITIVE, 1.0, 1.0, 1000)
    assert dict(s.ids) == {
        "user_id": hash64("user_id", "u1"),
        "item_id": hash64("item_id", "i1"),
        "city": hash64("city", "rome"),
    }
    assert s.key_hash == xxhash.xxh64_intdigest(b"r1\x1fi1", 0) == join_key_hash(("r1", "i1"))
    assert (j.counters.positives, j.pending_count) == (1, 0)


def test_negative_only_when_both_streams_pass_window_end_plus_lateness() -> None:
    j = PartitionJoiner(cfg(), NOW)
    j.impression(imp("r1", 1000), NOW)
    # impressions run far ahead, clicks lag: the watermark is held by the click stream
    assert kinds(j.impression(imp("r2", 5000, item="x"), NOW)) == []
    assert kinds(j.click(clk("zz", 1110, item="q"), origin(), NOW)) == []  # wm = 1100, not > 1100
    assert j.watermark == 1100
    assert kinds(j.click(clk("zz", 1111, item="q2"), origin(), NOW)) == [("r1", Kind.NEGATIVE)]
    assert j.counters.negatives == 1


def test_lagging_click_stream_still_yields_positive() -> None:
    j = PartitionJoiner(cfg(), NOW)
    for i in range(10):
        j.impression(imp(f"r{i}", 1000 + 50 * i), NOW)
    assert j.pending_count == 10  # no click seen yet: nothing may close
    out = []
    for i in range(10):
        out += j.click(clk(f"r{i}", 1000 + 50 * i + 90), origin(i), NOW)
    assert kinds(out) == [(f"r{i}", Kind.POSITIVE) for i in range(10)]
    assert j.counters.late_clicks == 0


def test_idle_streams_advance_with_wall_clock() -> None:
    j = PartitionJoiner(cfg(idle_ms=500), NOW)
    j.impression(imp("r1", 1000), NOW)
    j.click(clk("zz", 1000, item="q"), origin(), NOW)
    assert j.tick(NOW + 499) == []  # both streams still live, wm = 990
    # both idle from NOW: wm = 1000 + elapsed - 10 must exceed 1100
    assert j.tick(NOW + 110) == []
    assert j.tick(NOW + 600) != []  # 1000 + 600 - 10 > 1100
    assert j.counters.negatives == 1


def test_idle_click_stream_stops_holding_the_watermark() -> None:
    j = PartitionJoiner(cfg(idle_ms=500), NOW)
    j.impression(imp("r1", 1000), NOW)
    assert j.impression(imp("r2", 2000), NOW + 100) == []  # no click seen, not idle yet
    out = j.impression(imp("r3", 2001), NOW + 501)  # click stream idle: wm = 2001 - 10
    assert kinds(out) == [("r1", Kind.NEGATIVE)]


def test_unread_input_keeps_a_stream_from_going_idle() -> None:
    j = PartitionJoiner(cfg(idle_ms=500), NOW)
    j.impression(imp("r1", 1000), NOW)
    j.click(clk("zz", 1000, item="q"), origin(), NOW)
    j.mark_busy("click", NOW + 400)  # clicks are still waiting in the topic
    j.mark_busy("impression", NOW + 400)
    assert j.tick(NOW + 800) == []  # would be idle since NOW + 500 otherwise
    assert j.watermark == 990
    assert kinds(j.tick(NOW + 2000)) == [("r1", Kind.NEGATIVE)]  # 1000 + 1600 - 10


def test_first_event_after_start_restarts_the_idle_clock() -> None:
    j = PartitionJoiner(cfg(idle_ms=500), NOW)
    j.impression(imp("r1", 1000), NOW + 5000)  # assigned long before data arrived
    assert j.impression(imp("r2", 9000), NOW + 5100) == []  # clicks may still come
    assert kinds(j.click(clk("r1", 1050), origin(), NOW + 5200)) == [("r1", Kind.POSITIVE)]


@pytest.mark.parametrize("corrections", [False, True])
def test_click_after_window_is_late_and_optionally_corrects(corrections: bool) -> None:
    j = PartitionJoiner(cfg(late_corrections=corrections), NOW)
    j.impression(imp("r1", 1000), NOW)
    assert j.click(clk("r1", 1101), origin(), NOW) == []  # event time past the window
    assert j.counters.late_clicks == 1
    out = push_time(j, 1200)
    expected = [("r1", Kind.NEGATIVE)] + ([("r1", Kind.CORRECTION)] if corrections else [])
    assert kinds(out) == expected
    if corrections:
        assert [s.label for s in samples(out)] == [0.0, 1.0]


@pytest.mark.parametrize("corrections", [False, True])
def test_click_arriving_after_close_is_late(corrections: bool) -> None:
    j = PartitionJoiner(cfg(late_corrections=corrections), NOW)
    j.impression(imp("r1", 1000), NOW)
    assert kinds(push_time(j, 1200)) == [("r1", Kind.NEGATIVE)]
    out = j.click(clk("r1", 1050), origin(), NOW)  # inside the window, but too late
    assert kinds(out) == ([("r1", Kind.CORRECTION)] if corrections else [])
    assert j.counters.late_clicks == 1
    assert j.click(clk("r1", 1060), origin(), NOW) == []  # a second late click: duplicate
    assert j.counters.duplicate_clicks == 1


def test_positives_at_close_wait_for_the_window_and_keep_event_time_order() -> None:
    j = PartitionJoiner(cfg(positives_at_close=True), NOW)
    out = j.impression(imp("r1", 1000), NOW) + j.impression(imp("r2", 1020, item="i2"), NOW)
    out += j.click(clk("r2", 1030, item="i2"), origin(), NOW)
    out += j.click(clk("r2", 1031, item="i2"), origin(), NOW)  # a second click: duplicate
    assert kinds(out) == [] and j.pending_count == 2
    assert kinds(push_time(j, 1110)) == []  # wm 1100: r1's window [1000, 1100] not passed
    assert kinds(push_time(j, 1140)) == [("r1", Kind.NEGATIVE), ("r2", Kind.POSITIVE)]
    c = j.counters
    assert (c.positives, c.negatives, c.duplicate_clicks, c.late_clicks) == (1, 1, 1, 0)
    assert j.click(clk("r2", 1040, item="i2"), origin(), NOW) == []  # after the close
    assert j.counters.duplicate_clicks == 2


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_positives_at_close_label_every_key_as_positives_at_click_do(seed: int) -> None:
    events = _random_events(seed)
    at_click = PartitionJoiner(cfg(negative_rate=0.5), NOW)
    at_close = PartitionJoiner(cfg(negative_rate=0.5, positives_at_close=True), NOW)
    early = samples(_feed(at_click, events) + push_time(at_click, 10**6))
    late = samples(_feed(at_close, events) + push_time(at_close, 10**6))
    as_set = lambda out: sorted((key_of(s), s.kind, s.label, s.weight, s.event_time) for s in out)  # noqa: E731
    assert as_set(late) == as_set(early)
    # the same counts, except the final filler positive, still pending at close
    assert replace(at_close.counters, positives=0) == replace(at_click.counters, positives=0)
    assert at_close.counters.positives == at_click.counters.positives - 1 > 10
    # at close, samples leave in window-end (= impression time) order, whatever their label
    times = [s.event_time for s in late]
    assert times == sorted(times) and [s.event_time for s in early] != sorted(times)


def test_duplicate_impressions_and_clicks_yield_one_sample() -> None:
    j = PartitionJoiner(cfg(), NOW)
    out = j.impression(imp("r1", 1000), NOW) + j.impression(imp("r1", 1001), NOW)
    out += j.click(clk("r1", 1010), origin(), NOW) + j.click(clk("r1", 1011), origin(), NOW)
    out += j.impression(imp("r1", 1002), NOW)  # after the positive
    out += push_time(j, 5000)
    assert kinds(out) == [("r1", Kind.POSITIVE)]
    c = j.counters
    assert (c.duplicate_impressions, c.duplicate_clicks, c.negatives) == (2, 1, 0)


def test_click_before_its_impression_waits_then_joins() -> None:
    j = PartitionJoiner(cfg(), NOW)
    assert j.click(clk("r1", 1050), origin(), NOW) == []
    assert j.click(clk("r1", 1051), origin(), NOW) == []
    assert j.orphan_count == 1
    out = j.impression(imp("r1", 1000), NOW)
    assert kinds(out) == [("r1", Kind.POSITIVE)]
    assert (j.counters.duplicate_clicks, j.orphan_count) == (1, 0)


def test_click_without_impression_becomes_orphan_once_watermark_passes() -> None:
    j = PartitionJoiner(cfg(), NOW)
    j.click(clk("lost", 1000), origin(7), NOW)
    assert push_time(j, 1010) == []  # wm = 1000: not past the click yet
    out = push_time(j, 1011)
    [orphan] = [o for o in out if isinstance(o, OrphanClick)]
    assert orphan.click.request_id == "lost" and orphan.origin.offset == 7
    assert j.counters.orphan_clicks == 1


def test_late_impression_is_resolved_at_once() -> None:
    j = PartitionJoiner(cfg(), NOW)
    push_time(j, 5000)
    out = j.impression(imp("old", 1000), NOW)
    assert kinds(out) == [("old", Kind.NEGATIVE)]
    assert j.counters.late_impressions == 1


def test_keys_are_forgotten_after_retention() -> None:
    j = PartitionJoiner(cfg(retention_ms=1000), NOW)
    j.impression(imp("r1", 1000), NOW)
    j.click(clk("r1", 1010), origin(), NOW)
    push_time(j, 2110)  # wm 2100 = 1000 + window + retention: still remembered
    assert j.click(clk("r1", 1020), origin(), NOW) == []
    assert j.counters.duplicate_clicks == 1
    push_time(j, 2200)
    out = j.click(clk("r1", 1030), origin(), NOW)  # forgotten: no impression known any more
    assert [type(o) for o in out] == [OrphanClick]


# -- downsampling ---------------------------------------------------------------------------


def test_negative_downsampling_is_deterministic_and_reweighted() -> None:
    rate = 0.25
    keys = [(f"r{i}", "i1") for i in range(4000)]
    kept = [k for k in keys if keep_negative(k, rate)]
    # the documented draw: XXH64(request_id 0x1F item_id, seed 1) / 2**64 < rate
    assert kept == [
        k for k in keys if xxhash.xxh64_intdigest(f"{k[0]}\x1f{k[1]}".encode(), 1) < rate * 2**64
    ]
    assert abs(len(kept) / len(keys) - rate) < 0.03
    j = PartitionJoiner(cfg(negative_rate=rate), NOW)
    for rid, _ in keys[:400]:
        j.impression(imp(rid, 1000), NOW)
    out = samples(push_time(j, 9999))
    assert {key_of(s) for s in out if key_of(s)[0].startswith("r")} == set(kept) & set(keys[:400])
    assert {s.weight for s in out} == {4.0}
    assert j.counters.negatives + j.counters.negatives_dropped == 400


# -- state ----------------------------------------------------------------------------------


def _random_events(seed: int, n: int = 300) -> list[tuple[str, Any]]:
    rng = random.Random(seed)
    events: list[tuple[str, Any]] = []
    for i in range(n):
        t = 1000 + i * 7
        events.append(("imp", imp(f"r{i % 250}", t, item=f"i{i % 3}", city=f"c{i % 5}")))
        if rng.random() < 0.4:
            lag = rng.choice([5, 50, 99, 150, 400])
            events.append(
                ("clk", clk(f"r{rng.randrange(i - 5, i + 1) % 250}", t + lag, f"i{i % 3}"))
            )
    rng.shuffle(events[len(events) // 2 :])  # disorder in the second half
    return events


def _feed(j: PartitionJoiner, events: list[tuple[str, Any]], start: int = 0) -> list[Output]:
    out: list[Output] = []
    for n, (kind, ev) in enumerate(events, start):
        out += j.impression(ev, NOW) if kind == "imp" else j.click(ev, origin(n), NOW)
    return out


@pytest.mark.parametrize("at_close", [False, True])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_state_round_trip_gives_the_same_outputs(seed: int, at_close: bool) -> None:
    config = cfg(negative_rate=0.5, late_corrections=True, positives_at_close=at_close)
    events = _random_events(seed)
    whole = PartitionJoiner(config, NOW)
    expected = _feed(whole, events) + push_time(whole, 10**6)
    cut = len(events) // 3
    first = PartitionJoiner(config, NOW)
    got = _feed(first, events[:cut])
    second = PartitionJoiner(config, NOW)
    delta.restore(second, [delta.snapshot(first, {})])
    got += _feed(second, events[cut:], cut) + push_time(second, 10**6)
    assert got == expected
    assert second.counters == whole.counters
    assert whole.counters.positives > 10 and whole.counters.late_clicks > 0


def test_recovered_emissions_are_not_emitted_again() -> None:
    config = cfg(late_corrections=True)
    events = _random_events(5)
    original = PartitionJoiner(config, NOW)
    emitted = samples(_feed(original, events) + push_time(original, 10**6))
    replay = PartitionJoiner(config, NOW)
    for s in emitted[: len(emitted) // 2]:
        replay.recover_emitted([s.key_hash], [s.kind], [s.event_time])
    again = samples(_feed(replay, events) + push_time(replay, 10**6))
    assert [s.key_hash for s in again] == [s.key_hash for s in emitted[len(emitted) // 2 :]]
    assert replay.counters.replay_suppressed == len(emitted) // 2


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="negative_rate"):
        cfg(negative_rate=0.0)
    with pytest.raises(ValueError, match="idle_ms"):
        cfg(idle_ms=0)
    with pytest.raises(ValueError, match="window_ms"):
        cfg(window_ms=-1)


def test_counters_add() -> None:
    a, b = Counters(positives=2, clicks=3), Counters(positives=1, malformed=4)
    a.add(b)
    assert (a.positives, a.clicks, a.malformed) == (3, 3, 4)


# -- records, batching, engine ----------------------------------------------------------------

TOPICS = Topics("events.impressions", "events.clicks", "samples", "samples.dlq")


def imp_bytes(rid: str, t: int, item: str = "i1", user: str = "u1", **feat: str) -> bytes:
    record = {"request_id": rid, "user_id": user, "item_id": item, "event_time": t}
    return avro.encode("Impression", {**record, "features": feat or {"city": "paris"}})


def clk_bytes(rid: str, t: int, item: str = "i1", user: str = "u1") -> bytes:
    return avro.encode(
        "Click", {"request_id": rid, "user_id": user, "item_id": item, "event_time": t}
    )


def test_decoders_reject_garbage_and_unjoinable_records() -> None:
    assert decode_impression(imp_bytes("r", 5)).features == {"city": "paris"}
    assert decode_click(clk_bytes("r", 5)).event_time == 5
    with pytest.raises(CodecError) as garbage:
        decode_impression(b"\xff\x00garbage")
    assert garbage.value.reason == "avro_decode"
    with pytest.raises(CodecError) as wrong_schema:
        decode_impression(clk_bytes("r", 5))  # a click on the impressions topic
    assert wrong_schema.value.reason == "avro_decode"
    with pytest.raises(CodecError) as empty:
        decode_click(clk_bytes("", 5))
    assert empty.value.reason == "invalid_event"


def test_batcher_batches_by_count_and_linger_and_routes_by_user() -> None:
    batcher = SampleBatcher(SLOTS, partitions=4, batch_size=3, linger_ms=50)
    j = PartitionJoiner(cfg(), NOW)
    results = []
    for i in range(7):
        j.impression(imp(f"r{i}", 1000, user="same-user", city=f"c{i}"), NOW)
        batch = click_batch([clk(f"r{i}", 1001, user="same-user")], [origin()])
        results.append(j.process(batch, NOW).samples)
    rows = Samples.concat(results, len(SLOTS.slots))
    full = batcher.add(2, rows, NOW)
    assert [b.rows for b in full] == [3, 3] and batcher.buffered == 1
    assert {b.partition for b in full} == {hash64("user_id", "same-user") % 4}
    assert batcher.due(NOW + 49) == []
    [late] = batcher.due(NOW + 50)
    assert late.rows == 1
    batch = decode_batch(full[0].value, SLOTS)
    assert batch.labels.tolist() == [1.0, 1.0, 1.0]
    assert batch.slot_ids("city")[1].tolist() == [hash64("city", f"c{i}") for i in range(3)]
    source, keys, kinds_ = parse_headers(full[0].headers) or (None, None, None)
    assert source == 2
    assert keys is not None and keys.tolist() == rows.key[:3].tolist()
    assert kinds_ is not None and kinds_.tolist() == [1, 1, 1]
    assert parse_headers([(HEADER_SOURCE, b"1")]) is None


def test_engine_dead_letters_malformed_messages_with_origin() -> None:
    engine = JoinEngine(cfg(), TOPICS, SampleBatcher(SLOTS, 2, 100, 0))
    engine.assign(0, None, NOW)
    [dead] = engine.handle("events.clicks", 0, 41, b"key", b"\x01garbage", NOW)
    assert dead.topic == "samples.dlq" and dead.key == b"key"
    rec = avro.decode("DeadLetter", dead.value)
    assert (rec["value"], rec["source_topic"], rec["source_partition"], rec["source_offset"]) == (
        b"\x01garbage",
        "events.clicks",
        0,
        41,
    )
    assert rec["reason"] == "avro_decode" and rec["failed_at"] == NOW
    assert engine.positions[0] == {"clicks": 42}
    assert engine.counters().malformed == 1


def test_engine_orphan_click_dead_letter_keeps_original_bytes() -> None:
    engine = JoinEngine(cfg(), TOPICS, SampleBatcher(SLOTS, 2, 100, 0))
    engine.assign(3, None, NOW)
    raw = clk_bytes("nobody", 1000)
    assert engine.handle("events.clicks", 3, 0, b"nobody", raw, NOW) == []
    engine.handle("events.impressions", 3, 0, None, imp_bytes("x", 2000), NOW)
    out = engine.handle("events.clicks", 3, 1, None, clk_bytes("y", 2000, item="z"), NOW)
    [dead] = [r for r in out if r.topic == "samples.dlq"]
    rec = avro.decode("DeadLetter", dead.value)
    assert (rec["reason"], rec["value"], rec["source_offset"]) == ("orphan_click", raw, 0)


def test_engine_checkpoint_round_trip_and_replay_dedup() -> None:
    def fresh() -> JoinEngine:
        return JoinEngine(cfg(), TOPICS, SampleBatcher(SLOTS, 2, 100, 0))

    first = fresh()
    first.assign(1, None, NOW)
    first.handle("events.impressions", 1, 0, None, imp_bytes("r1", 1000), NOW)
    blob = first.checkpoint(1, {"samples": {"0": 5}, "dlq": {"0": 9}})
    assert JoinEngine.checkpoint_outputs(blob) == {"samples": {"0": 5}, "dlq": {"0": 9}}
    # what happened after the checkpoint before a crash: a positive and a dead letter
    emitted = first.handle("events.clicks", 1, 0, None, clk_bytes("r1", 1010), NOW)
    emitted += first.handle("events.clicks", 1, 1, None, b"bad", NOW) + first.drain()
    second = fresh()
    assert second.assign(1, [blob], NOW) == {"impressions": 1}
    for rec in emitted:
        if rec.topic == "samples":
            assert second.recover_sample(rec.headers, rec.value) == 1
        else:
            assert second.recover_dead_letter(rec.value) == ("events.clicks", 1, 1)
    replayed = second.handle("events.clicks", 1, 0, None, clk_bytes("r1", 1010), NOW)
    replayed += second.handle("events.clicks", 1, 1, None, b"bad", NOW) + second.drain()
    assert replayed == []
    assert second.counters().replay_suppressed == 1
    with pytest.raises(ValueError, match="partition"):
        fresh().assign(2, [blob], NOW)


# -- settings and CLI ----------------------------------------------------------------------


def test_settings_parse_slots_and_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_JOINER_SLOTS", " user_id, item_id ,C1")
    monkeypatch.setenv("PIPELINE_JOINER_NEGATIVE_RATE", "0.1")
    s = JoinerSettings()
    assert s.slot_config() == SlotConfig(("user_id", "item_id", "C1"))
    assert s.negative_rate == 0.1
    with pytest.raises(ValueError, match="duplicate"):
        JoinerSettings(slots="a,a")
    with pytest.raises(ValueError, match="negative_rate"):
        JoinerSettings(negative_rate=1.5)


def test_join_command_reports_bad_settings() -> None:
    from pipeline.cli.join import join
    from pipeline.cli.main import _Group

    group = _Group("pipeline", commands={"join": join})
    result = CliRunner().invoke(group, ["join", "--negative-rate", "0", "--slots", "a,a"])
    assert result.exit_code == 1
    assert "error: invalid JoinerSettings" in result.output
    assert "negative_rate (PIPELINE_JOINER_NEGATIVE_RATE)" in result.output
    assert "slots (PIPELINE_JOINER_SLOTS)" in result.output


def test_downsampled_batches_carry_inverse_rate_weights() -> None:
    batcher = SampleBatcher(SLOTS, 1, 10_000, 0, negative_rate=0.5)
    engine = JoinEngine(cfg(negative_rate=0.5), TOPICS, batcher)
    engine.assign(0, None, NOW)
    for i in range(200):
        engine.handle("events.impressions", 0, i, None, imp_bytes(f"r{i}", 1000), NOW)
    engine.handle("events.impressions", 0, 200, None, imp_bytes("zz", 5000, item="q"), NOW)
    engine.handle("events.clicks", 0, 0, None, clk_bytes("zz", 5000, item="q"), NOW)
    [batch_rec] = engine.drain()  # one source and output partition: one batch
    batch = decode_batch(batch_rec.value)
    _, keys, kinds_ = parse_headers(batch_rec.headers) or (None, np.zeros(0), np.zeros(0))
    negative = kinds_ == Kind.NEGATIVE
    kept = [i for i in range(200) if keep_negative((f"r{i}", "i1"), 0.5)]
    assert 70 < len(kept) < 130
    assert sorted(keys[negative].tolist()) == sorted(join_key_hash((f"r{i}", "i1")) for i in kept)
    assert np.all(batch.weights[negative] == 2.0) and np.all(batch.labels[negative] == 0.0)
    assert batch.labels[~negative].tolist() == [1.0] and batch.weights[~negative].tolist() == [1.0]
