"""Metric sinks against the real Redis and broker, and a real Prometheus HTTP endpoint."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from confluent_kafka import Producer
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from redis.crc import key_slot
from sklearn.metrics import roc_auc_score

from pipeline.cli.metrics import metrics
from pipeline.errors import PipelineError
from pipeline.train.metrics import SUMMARY_KEYS, MetricCounts, WindowedMetrics, bucket_index
from pipeline.train.metrics_sink import (
    MetricsPublisher,
    PrometheusExporter,
    RedisMetricsSink,
    decode_metric,
    merged_auc,
)
from tests.kafkautil import drain

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0  # a window boundary for 10 s windows


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.beta(1.0, 5.0, n)
    y = (rng.random(n) < np.clip(1.3 * p, 0, 1)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, n)
    return p, y, w


def _close(a: MetricCounts, b: MetricCounts) -> None:
    np.testing.assert_array_equal(a.pos, b.pos)
    np.testing.assert_array_equal(a.neg, b.neg)
    np.testing.assert_allclose(a.pred_sum, b.pred_sum, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a._scalars(), b._scalars(), rtol=1e-12)


def _two_trainers(sink: RedisMetricsSink) -> dict[str, Any]:
    """Trainers a and b each score two windows of their half of the data and publish."""
    p, y, w = _data(11, 12_000)
    halves = {"trainer-a": slice(0, 5_000), "trainer-b": slice(5_000, None)}
    window_parts: dict[str, list[MetricCounts]] = {}
    for name, part in halves.items():
        clock = FakeClock(T0 + 1.0)
        wm = WindowedMetrics(10.0, clock=clock)
        pp, yy, ww = p[part], y[part], w[part]
        mid = pp.size // 3
        wm.update(pp[:mid], yy[:mid], ww[:mid], np.full(mid, 5))
        clock.now = T0 + 12.0  # the second window
        wm.update(pp[mid:], yy[mid:], ww[mid:])
        first = wm.roll()
        assert first is not None and first.window_start_ms == int(T0 * 1000)
        sink.publish(name, wm.cumulative, first)
        second = wm.roll(force=True)
        assert second is not None
        sink.publish(name, wm.cumulative, second)
        window_parts[name] = [first.counts, second.counts]
    return {"p": p, "y": y, "w": w, "windows": window_parts}


def test_two_trainers_merge_into_exact_global_metrics(redis_client: Any, unique: str) -> None:
    sink = RedisMetricsSink(redis_client, f"job{unique}")
    data = _two_trainers(sink)
    p, y, w = data["p"], data["y"], data["w"]

    total, trainers = sink.global_cumulative()
    assert trainers == ["trainer-a", "trainer-b"] == sink.trainers()
    expected = MetricCounts()
    expected.update(p, y, w)
    _close(total, expected)
    assert total.auc() == pytest.approx(roc_auc_score(y, bucket_index(p)), abs=1e-9)
    assert total.summary() == pytest.approx(expected.summary(), rel=1e-9)
    assert total.max_event_time_ms == 5

    # Re-publishing the same cumulative counts changes nothing (overwrite, not add).
    sink.publish("trainer-a", sink.load("trainer-a") or MetricCounts())
    again, _ = sink.global_cumulative()
    assert again == total

    starts = sink.windows()
    assert starts == [int(T0 * 1000) + 10_000, int(T0 * 1000)]
    for i, start in enumerate(reversed(starts)):
        merged, who = sink.global_window(start)
        assert who == ["trainer-a", "trainer-b"]
        parts = data["windows"]
        _close(merged, parts["trainer-a"][i] + parts["trainer-b"][i])
        ttl = redis_client.ttl(sink.window_key(start))
        assert 0 < ttl <= sink.window_ttl_s
    assert sink.load("nobody") is None


def test_keys_share_one_cluster_slot_per_job(redis_client: Any, unique: str) -> None:
    sink = RedisMetricsSink(redis_client, f"job{unique}")
    keys = [sink.cum_key, sink.windows_key, sink.window_key(0), sink.window_key(10**12)]
    assert all(f"{{job{unique}}}" in k for k in keys)
    assert len({key_slot(k.encode()) for k in keys}) == 1
    with pytest.raises(ValueError, match="braces"):
        RedisMetricsSink(redis_client, "a{b}")
    with pytest.raises(ValueError):
        sink.publish("", MetricCounts())


def test_unreadable_or_unmergeable_counts_are_clear_errors(redis_client: Any, unique: str) -> None:
    sink = RedisMetricsSink(redis_client, f"job{unique}")
    sink.publish("small", MetricCounts(10))
    sink.publish("big", MetricCounts(100))
    with pytest.raises(PipelineError, match="buckets"):
        sink.global_cumulative()
    redis_client.hset(sink.cum_key, "broken", b"PMET garbage")
    with pytest.raises(PipelineError, match="'broken'"):
        sink.per_trainer()


def test_publisher_records_decode_with_auc_buckets(
    kafka_bootstrap: str, project_topics: dict[str, str]
) -> None:
    topic = project_topics["metrics"]
    publisher = MetricsPublisher(Producer({"bootstrap.servers": kafka_bootstrap}), topic)
    p, y, w = _data(12, 4_000)
    counts = {"t1": MetricCounts(), "t2": MetricCounts()}
    counts["t1"].update(p[:1500], y[:1500], w[:1500])
    counts["t2"].update(p[1500:], y[1500:], w[1500:])
    for name, c in counts.items():
        assert publisher.publish(name, c, 1000, 2000, "window", {"job": "j", "model": "lr"}) == 9
    publisher.publish("t1", MetricCounts(), 0, 2000, "cumulative")
    assert publisher.flush(10.0) == 0
    assert publisher.stats.delivered == 27 and publisher.stats.failed == 0
    with pytest.raises(ValueError, match="scope"):
        publisher.publish("t1", MetricCounts(), 0, 1, "yearly")

    messages = drain(kafka_bootstrap, topic, until=27)
    records = [(m.key().decode(), decode_metric(m.value())) for m in messages]
    assert len(records) == 27
    window = {key: r for key, r in records if r["labels"]["scope"] == "window"}
    assert set(window) == {f"{n}|{t}|window" for n in SUMMARY_KEYS for t in ("t1", "t2")}
    for name, c in counts.items():
        summary = c.summary()
        for metric in SUMMARY_KEYS:
            r = window[f"{metric}|{name}|window"]
            assert r["trainer_id"] == name and r["name"] == metric
            assert (r["window_start_ms"], r["window_end_ms"]) == (1000, 2000)
            assert r["labels"] == {"job": "j", "model": "lr", "scope": "window"}
            assert r["value"] == pytest.approx(summary[metric], rel=0, abs=0, nan_ok=True)
            if metric == "auc":
                assert r["auc_buckets"] == c.auc_buckets_bytes()
            else:
                assert r["auc_buckets"] is None
    auc_records = [window["auc|t1|window"], window["auc|t2|window"]]
    assert merged_auc(auc_records) == pytest.approx(roc_auc_score(y, bucket_index(p)), abs=1e-9)
    empty = {key: r for key, r in records if r["labels"]["scope"] == "cumulative"}
    assert empty["samples|t1|cumulative"]["value"] == 0
    assert math.isnan(empty["auc|t1|cumulative"]["value"])


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_prometheus_endpoint_serves_gauges() -> None:
    p, y, _ = _data(13, 3_000)
    counts = MetricCounts()
    counts.update(p, y)
    exporter = PrometheusExporter(0, "t1", "jobx", addr="127.0.0.1")
    other = PrometheusExporter(0, "t2", "jobx", addr="127.0.0.1")  # own registry: no clash
    with exporter, other:
        assert exporter.port and other.port and exporter.port != other.port
        exporter.update(counts, "cumulative")
        exporter.set_summary("window", {"auc": 0.5, "samples": 10.0})
        exporter.set_extra("stage_seconds", 1.5, "seconds in a stage", {"stage": "io"})
        exporter.set_extra("pipeline_train_dead_letters", 3, labels={"reason": "avro_decode"})
        got = _scrape(exporter.port)
        base = (("job", "jobx"), ("scope", "cumulative"), ("trainer", "t1"))
        assert got[("pipeline_train_auc", base)] == pytest.approx(counts.auc())
        assert got[("pipeline_train_logloss", base)] == pytest.approx(counts.logloss())
        assert got[("pipeline_train_samples", base)] == 3_000
        window = (("job", "jobx"), ("scope", "window"), ("trainer", "t1"))
        assert got[("pipeline_train_auc", window)] == 0.5
        io = (("job", "jobx"), ("stage", "io"), ("trainer", "t1"))
        assert got[("pipeline_train_stage_seconds", io)] == 1.5
        dlq = (("job", "jobx"), ("reason", "avro_decode"), ("trainer", "t1"))
        assert got[("pipeline_train_dead_letters", dlq)] == 3
        assert not any(k[0].startswith("pipeline_train") for k in _scrape(other.port))
        with pytest.raises(ValueError, match="labels"):
            exporter.set_extra("stage_seconds", 1.0, labels={"phase": "x"})
        with pytest.raises(ValueError, match="reserved"):
            exporter.set_extra("auc", 1.0)
        port = exporter.port
    assert not any(m.name.startswith("pipeline_train") for m in REGISTRY.collect())
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_metrics_show_cli(redis_client: Any, redis_url: str, unique: str) -> None:
    job = f"job{unique}"
    data = _two_trainers(RedisMetricsSink(redis_client, job))
    runner = CliRunner()
    result = runner.invoke(metrics, ["show", "--job", job, "--redis-url", redis_url])
    assert result.exit_code == 0, result.output
    assert f"job {job}: 2 trainers, 12,000 rows" in result.output
    assert "trainer-a" in result.output and "trainer-b" in result.output

    result = runner.invoke(metrics, ["show", "--job", job, "--redis-url", redis_url, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["global"]["samples"] == 12_000
    assert report["trainers"]["trainer-a"]["samples"] == 5_000
    expected_auc = roc_auc_score(data["y"], bucket_index(data["p"]))
    assert report["global"]["auc"] == pytest.approx(expected_auc, abs=1e-9)
    assert [w["trainers"] for w in report["windows"]] == [["trainer-a", "trainer-b"]] * 2

    missing = runner.invoke(metrics, ["show", "--job", f"none{unique}", "--redis-url", redis_url])
    assert isinstance(missing.exception, PipelineError)
    assert "no metrics for job" in str(missing.exception)
