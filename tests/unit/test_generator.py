"""Synthetic traffic: determinism, drift, the true probabilities, and exact event counts."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.codec import avro, hash64
from pipeline.codec.errors import CodecError
from pipeline.codec.samplebatch import concat
from pipeline.ingest.generator import (
    SLOTS,
    GeneratorError,
    TrafficConfig,
    TrafficGenerator,
    exact_auc,
)

pytestmark = pytest.mark.unit


def collect(gen: TrafficGenerator, n: int, batch_rows: int = 1024) -> tuple[object, np.ndarray]:
    pairs = list(gen.samples(n, batch_rows))
    return concat([b for b, _ in pairs]), np.concatenate([p for _, p in pairs])


def test_same_seed_same_stream_regardless_of_batching() -> None:
    a, pa = collect(TrafficGenerator(seed=7), 3000, 1000)
    b, pb = collect(TrafficGenerator(seed=7), 3000, 257)
    assert a.equals(b) and np.array_equal(pa, pb)
    prefix, _ = collect(TrafficGenerator(seed=7), 1000)
    assert prefix.equals(a.slice(0, 1000))
    c, _ = collect(TrafficGenerator(seed=8), 3000)
    assert not c.equals(a)
    assert [b.num_rows for b, _ in TrafficGenerator(seed=7).samples(2500, 1000)] == [1000] * 2 + [
        500
    ]


def test_events_are_deterministic() -> None:
    cfg = TrafficConfig(seed=3, duplicate_clicks=4, malformed_events=6)
    one, two = TrafficGenerator(cfg).events(2000), TrafficGenerator(cfg).events(2000)
    assert one.impressions == two.impressions and one.clicks == two.clicks
    assert [m.data for m in one.malformed] == [m.data for m in two.malformed]


def test_true_p_is_the_model_and_samples_match_events() -> None:
    gen = TrafficGenerator(seed=11, items_per_request=4)
    batch, p = collect(gen, 2000)
    log = gen.events(2000)
    assert np.array_equal(log.true_p, p)
    assert np.array_equal(batch.labels, (log.click_delay_ms >= 0).astype(np.float32))
    idx = {
        s: np.array([int(i["features"][s].lstrip("uic")) for i in log.impressions])
        for s in SLOTS
        if s != "device"
    }
    devices = np.array([gen.config.devices.index(i["features"]["device"]) for i in log.impressions])
    times = batch.event_times
    want = gen.probability(idx["user_id"], idx["item_id"], devices, idx["position"], times)
    np.testing.assert_allclose(p, want, rtol=1e-12)
    assert np.array_equal(gen.item_category[idx["item_id"]], idx["category"])
    for r in (0, 1, 1999):
        feats = log.impressions[r]["features"]
        assert {s: ids.tolist() for s, ids in batch.row_features(r).items()} == {
            s: [hash64(s, feats[s])] for s in SLOTS
        }
    by_request: dict[str, list[str]] = {}
    for imp in log.impressions:
        by_request.setdefault(imp["request_id"], []).append(imp["item_id"])
        assert avro.decode("Impression", avro.encode("Impression", imp)) == imp
    assert all(len(v) == len(set(v)) for v in by_request.values())  # distinct per request
    assert {len(v) for v in list(by_request.values())[:-1]} == {4}


def test_rate_and_time_order() -> None:
    gen = TrafficGenerator(seed=2, rate=500.0)
    batch, _ = collect(gen, 60_000)
    times = batch.event_times
    assert (np.diff(times) >= 0).all()
    span_s = (times[-1] - times[0]) / 1000.0
    assert span_s == pytest.approx(60_000 / 500.0, rel=0.03)


def test_bayes_auc_matches_sklearn_and_ctr_matches_mean_p() -> None:
    gen = TrafficGenerator(seed=5)
    batch, p = collect(gen, 40_000)
    labels = batch.labels
    assert gen.bayes_auc(40_000) == pytest.approx(roc_auc_score(labels, p), abs=1e-12)
    assert 0.6 < gen.bayes_auc(40_000) < 0.95  # informative but noisy, like real CTR data
    sigma = math.sqrt(float((p * (1 - p)).sum())) / len(p)
    assert abs(labels.mean() - p.mean()) < 4 * sigma


def test_exact_auc_with_ties_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = rng.integers(0, 7, 500).astype(float)  # many ties
    assert exact_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    with pytest.raises(ValueError, match="both"):
        exact_auc([1, 1], [0.2, 0.3])


def item_p_shift(gen: TrafficGenerator) -> float:
    """Mean |change| of an item's average true p between [0, T/4) and [T/2, 3T/4)."""
    t0, period_ms = gen.config.start_time_ms, gen.config.drift_period_s * 1000
    log = gen.events(40_000)
    times = np.array([i["event_time"] for i in log.impressions])
    items = np.array([int(i["item_id"][1:]) for i in log.impressions])
    first = times < t0 + period_ms / 4
    second = (times >= t0 + period_ms / 2) & (times < t0 + 3 * period_ms / 4)
    shifts = []
    for item in np.unique(items).tolist():
        a, b = first & (items == item), second & (items == item)
        if a.sum() >= 20 and b.sum() >= 20:
            shifts.append(abs(log.true_p[a].mean() - log.true_p[b].mean()))
    assert len(shifts) >= 5
    return float(np.mean(shifts))


def test_item_ctr_and_popularity_drift() -> None:
    gen = TrafficGenerator(seed=9, drift_period_s=100.0, ctr_drift=1.0, popularity_drift=1.5)
    t0 = gen.config.start_time_ms
    items = np.arange(gen.config.num_items)
    early, late = gen.item_logit(items, t0), gen.item_logit(items, t0 + 50_000)
    assert np.abs(early - late).mean() > 0.8  # half a period: 2*amp*E|sin| ~ 1.27
    top_early = np.argsort(gen.item_popularity(t0))[-20:]
    top_late = np.argsort(gen.item_popularity(t0 + 50_000))[-20:]
    assert len(set(top_early) & set(top_late)) < 20
    still = TrafficGenerator(seed=9, drift_period_s=100.0, ctr_drift=0.0, popularity_drift=1.5)
    assert np.array_equal(still.item_logit(items, t0), still.item_logit(items, t0 + 50_000))
    # the drift reaches the traffic: the same items' true CTR moves half a period later,
    # far more than the user-mix noise of a generator without CTR drift
    drifting, static = item_p_shift(gen), item_p_shift(still)
    assert drifting > 0.02 and drifting > 3 * static


def test_late_duplicate_and_malformed_counts_are_exact() -> None:
    cfg = TrafficConfig(
        seed=4,
        late_click_fraction=0.1,
        duplicate_clicks=7,
        malformed_events=9,
        attribution_window_ms=60_000,
        mean_click_delay_ms=20_000,
    )
    log = TrafficGenerator(cfg).events(5000)
    delay = log.click_delay_ms
    clicked = int((delay >= 0).sum())
    assert log.late_clicks == round(0.1 * clicked) == int((delay > 60_000).sum())
    assert (delay[(delay >= 0) & (delay <= 60_000)] <= 54_000).all()  # on time: <= 0.9 window
    assert (delay[delay > 60_000] >= 66_000).all()  # late: >= 1.1 window
    assert len(log.clicks) == clicked + 7
    pairs = Counter((c["request_id"], c["item_id"]) for c in log.clicks)
    assert sum(n - 1 for n in pairs.values()) == 7
    assert len(log.positives()) == clicked - log.late_clicks
    assert len(log.positives(window_ms=10**9)) == clicked
    assert log.labels().sum() == len(log.positives())
    impressions = {(i["request_id"], i["item_id"]): i["event_time"] for i in log.impressions}
    for click in log.clicks:
        assert avro.decode("Click", avro.encode("Click", click)) == click
        assert click["event_time"] > impressions[(click["request_id"], click["item_id"])]
    assert [c["event_time"] for c in log.clicks] == sorted(c["event_time"] for c in log.clicks)
    assert len(log.malformed) == 9
    assert {m.topic for m in log.malformed} == {"events.impressions", "events.clicks"}
    for m in log.malformed:
        with pytest.raises(CodecError) as err:
            avro.decode("Impression" if m.topic == "events.impressions" else "Click", m.data)
        assert err.value.reason == m.reason


def test_dataset_view_and_settings_errors() -> None:
    ds = TrafficGenerator(seed=1).dataset(2500)
    assert [b.num_rows for b in ds.batches(1000)] == [1000, 1000, 500]
    assert ds.config.slots == SLOTS
    with pytest.raises(GeneratorError, match="items_per_request"):
        TrafficConfig(num_items=2, items_per_request=3)
    with pytest.raises(GeneratorError, match="base_ctr"):
        TrafficGenerator(base_ctr=1.5)
    with pytest.raises(GeneratorError, match="unknown generator setting"):
        TrafficGenerator(colour="red")
    with pytest.raises(GeneratorError, match="on-time click"):
        TrafficGenerator(base_ctr=1e-9, duplicate_clicks=1, ctr_drift=0).events(3)


def test_event_blocks_stream_in_time_order_and_concatenate_to_events() -> None:
    cfg = TrafficConfig(
        seed=6,
        rate=3000.0,
        attribution_window_ms=2000,
        mean_click_delay_ms=400,
        late_click_fraction=0.2,
        duplicate_clicks=11,
        malformed_events=3,
    )
    gen = TrafficGenerator(cfg)
    n = 10_000  # 7 blocks of 1536 impressions, the last one cut
    blocks = list(gen.event_blocks(n))
    assert [b.impressions for b in blocks] == [1536] * 6 + [n - 6 * 1536]
    assert [len(b.malformed) for b in blocks] == [3] + [0] * 6
    # each block's clicks come before its last impression time, every later event at or
    # after it: the concatenated blocks are both streams in event-time order
    for b, nxt in itertools.pairwise(blocks):
        assert (b.click_time < b.time[-1]).all()
        assert nxt.time[0] >= b.time[-1] and (nxt.click_time >= b.time[-1]).all()
    clicks = np.concatenate([b.click_time for b in blocks])
    assert (np.diff(clicks) >= 0).all()
    # every prefix of blocks holds exactly round(fraction x clicks so far) late clicks
    seen = late = 0
    for b in blocks:
        seen += int((b.click_delay_ms >= 0).sum())
        late += b.late_clicks
        assert (
            late
            == round(0.2 * seen)
            == int((np.concatenate([x.click_delay_ms for x in blocks[: b.index + 1]]) > 2000).sum())
        )
    assert sum(b.duplicate_clicks for b in blocks) == 11
    log = gen.events(n)
    assert log.impressions == [r for b in blocks for r in gen.impression_records(b)]
    assert log.clicks == [r for b in blocks for r in gen.click_records(b)]
    assert len(log.clicks) == seen + 11


def test_event_blocks_are_generated_on_the_fly_and_prefix_stable() -> None:
    gen = TrafficGenerator(seed=8)
    first = next(gen.event_blocks(10**12))  # no up-front work over n
    assert first.impressions == 1536
    short, long = list(gen.event_blocks(4000)), list(gen.event_blocks(9000))
    for a, b in zip(short[:-1], long, strict=False):  # full blocks do not depend on n
        assert a.time.tolist() == b.time.tolist()
        assert a.click_time.tolist() == b.click_time.tolist()
        assert a.click_delay_ms.tolist() == b.click_delay_ms.tolist()
    empty = list(TrafficGenerator(seed=8, malformed_events=2).event_blocks(0))
    assert [(b.impressions, b.clicks, len(b.malformed)) for b in empty] == [(0, 0, 2)]
    with pytest.raises(GeneratorError, match="n >= 0"):
        next(gen.event_blocks(-1))
