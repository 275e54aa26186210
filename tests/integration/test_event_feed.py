"""The demo's event feed against the real broker: paced, complete, keyed and
partitioned like EventProducer, and every body the generator's record."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from pipeline.codec import avro
from pipeline.demo.feeds import EventFeed
from pipeline.ingest.delivery import partition_for
from pipeline.ingest.generator import TrafficGenerator, exact_auc
from tests.kafkautil import drain

pytestmark = pytest.mark.integration


def test_feed_sends_every_event_paced_keyed_and_copartitioned(
    kafka_bootstrap: str, project_topics: dict[str, str]
) -> None:
    imps_topic, clicks_topic = project_topics["events.impressions"], project_topics["events.clicks"]
    rate, n = 2000.0, 6000  # 3 s of impressions; clicks up to 2 windows (0.6 s) later
    gen = TrafficGenerator(
        seed=9,
        rate=rate,
        start_time_ms=int(time.time() * 1000),
        attribution_window_ms=300,
        mean_click_delay_ms=60,
        late_click_fraction=0.2,
        duplicate_clicks=5,
        malformed_events=4,
    )
    log = gen.events(n)
    # a queue of 50 messages: sends wait for room instead of failing or dropping
    feed = EventFeed(
        kafka_bootstrap, imps_topic, clicks_topic, gen, n, **{"queue.buffering.max.messages": 50}
    )
    feed.start()
    feed.join(60)
    assert not feed.is_alive() and feed.error is None
    assert (feed.impressions, feed.clicks, feed.malformed) == (n, len(log.clicks), 4)
    assert feed.expected_samples == n and feed.failed == 0
    # paced: it took about the generated span, not a burst
    span_s = (log.clicks[-1]["event_time"] - log.impressions[0]["event_time"]) / 1000
    assert feed.started_at is not None and feed.ended_at is not None
    assert feed.ended_at - feed.started_at > 0.8 * span_s
    assert feed.bayes_auc() == pytest.approx(exact_auc(log.labels(), log.true_p), abs=1e-12)

    shift: int | None = None  # the feed moves every event time by its start delay
    for logical, schema, records in (
        ("events.impressions", "Impression", log.impressions),
        ("events.clicks", "Click", log.clicks),
    ):
        topic = project_topics[logical]
        msgs = drain(kafka_bootstrap, topic, until=len(records) + 2)
        good = [m for m in msgs if m.key() is not None]
        malformed = Counter(m.value() for m in msgs if m.key() is None)
        assert malformed == Counter(e.data for e in log.malformed if e.topic == logical)
        decoded = [avro.decode(schema, m.value()) for m in good]
        times: dict[int, list[int]] = {}
        for m, rec in zip(good, decoded, strict=True):
            assert m.key() == rec["request_id"].encode()  # keyed as EventProducer keys
            assert m.partition() == partition_for(m.key(), 6)  # clicks beside impressions
            times.setdefault(m.partition(), []).append(rec["event_time"])
        assert all(t == sorted(t) for t in times.values())  # each partition in time order
        if shift is None:
            shift = min(r["event_time"] for r in decoded) - records[0]["event_time"]
            assert shift >= 0
        want = [{**r, "event_time": r["event_time"] + shift} for r in records]
        assert sorted(map(repr, decoded)) == sorted(map(repr, want))
