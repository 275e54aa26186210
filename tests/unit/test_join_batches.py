"""The batch join against the per-event reference join (tests/join_reference.py).

Random event streams (duplicates, clicks before impressions, late clicks, disorder,
idle gaps) are fed to both: to the reference one event at a time, to
:class:`PartitionJoiner` in random batches with the same wall clock per batch. Every
sample, orphan and counter must agree.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict
from typing import Any

import pytest

from pipeline.codec.slots import SlotConfig
from pipeline.joiner.logic import (
    JoinConfig,
    JoinResult,
    PartitionJoiner,
    click_batch,
    impression_batch,
)
from pipeline.joiner.records import Click, Impression, Origin
from tests import join_reference as ref

pytestmark = pytest.mark.unit

SLOTS = SlotConfig(("user_id", "item_id", "city"))
NOW = 1_000_000


def events(seed: int, n: int = 400) -> list[tuple[str, Any]]:
    rng = random.Random(seed)
    out: list[tuple[str, Any]] = []
    for i in range(n):
        t = 1000 + i * 7 + rng.choice([0, 0, 0, -30, 40])
        rid = f"r{rng.randrange(i - 3, i + 1) % 300 if rng.random() < 0.1 else i}"
        item = f"i{i % 3}"
        feats = {"city": f"c{i % 5}"} if rng.random() < 0.9 else {"city": "x", "other": "y"}
        if rng.random() < 0.85:
            out.append(("imp", Impression(rid, f"u{i % 11}", item, t, feats)))
        if rng.random() < 0.35:
            lag = rng.choice([-20, 5, 50, 99, 100, 150, 400])
            k = rng.randrange(max(0, i - 5), i + 1)
            out.append(("clk", Click(f"r{k}", "u", f"i{k % 3}", t + lag)))
        if rng.random() < 0.05:
            out.append(("clk", Click(f"ghost{i}", "u", "x", t)))
    rng.shuffle(out[len(out) // 2 : len(out) // 2 + 60])
    return out


def origin(n: int) -> Origin:
    return Origin("events.clicks", 0, n, None, b"raw")


def ref_outputs(outs: list[Any]) -> tuple[Counter[Any], Counter[int]]:
    samples: Counter[Any] = Counter()
    orphans: Counter[int] = Counter()
    for o in outs:
        if isinstance(o, ref.OrphanClick):
            orphans[o.origin.offset] += 1
        else:
            ids = tuple(sorted(o.ids.items()))
            samples[(o.key_hash, int(o.kind), o.label, o.weight, o.event_time, ids)] += 1
    return samples, orphans


def batch_outputs(j: PartitionJoiner, results: list[JoinResult]) -> tuple[Counter[Any], ...]:
    samples: Counter[Any] = Counter()
    orphans: Counter[int] = Counter()
    for res in results:
        for o in j.outputs(res):
            if hasattr(o, "origin"):
                orphans[o.origin.offset] += 1  # type: ignore[union-attr]
            else:
                ids = tuple(sorted(o.ids.items()))  # type: ignore[union-attr]
                row = (o.key_hash, int(o.kind), o.label, o.weight, o.event_time, ids)  # type: ignore[union-attr]
                samples[row] += 1
    return samples, orphans


def run_both(config: JoinConfig, evs: list[tuple[str, Any]], seed: int) -> None:
    rng = random.Random(seed)
    reference = ref.PartitionJoiner(
        ref.JoinConfig(**{f: getattr(config, f) for f in config.__dataclass_fields__}), NOW
    )
    joiner = PartitionJoiner(config, NOW)
    ref_out: list[Any] = []
    results: list[JoinResult] = []
    now, i, n = NOW, 0, len(evs)
    while i < n:
        size = rng.choice([1, 1, 2, 3, 7, 20, 60])
        chunk = evs[i : i + size]
        for k, (kind, ev) in enumerate(chunk, i):
            if kind == "imp":
                ref_out += reference.impression(ev, now)
            else:
                ref_out += reference.click(ev, ref.Origin("events.clicks", 0, k, None, b"raw"), now)
        results.append(joiner.process(_batch(chunk, i, config), now))
        i += size
        now += rng.choice([0, 0, 10, 50, 300])
        if rng.random() < 0.1:
            ref_out += reference.advance(now)
            results.append(joiner.advance(now))
    now += 10**6  # idle: everything closes
    ref_out += reference.advance(now)
    results.append(joiner.advance(now))
    assert batch_outputs(joiner, results) == ref_outputs(ref_out)
    assert asdict(joiner.counters) == asdict(reference.counters)
    assert joiner.watermark == reference.watermark


def _batch(chunk: list[tuple[str, Any]], start: int, config: JoinConfig) -> Any:
    """One mixed batch, in order, built from the single-kind helpers."""
    import numpy as np

    from pipeline.joiner.logic import EventBatch

    parts = []
    for k, (kind, ev) in enumerate(chunk, start):
        parts.append(
            impression_batch([ev], config) if kind == "imp" else click_batch([ev], [origin(k)])
        )
    s = len(config.slots.slots)

    def col(name: str) -> Any:
        return np.concatenate([getattr(p, name) for p in parts])

    def mat(name: str) -> Any:
        return np.concatenate(
            [
                getattr(p, name)
                if getattr(p, name).shape[1]
                else np.zeros((1, s), getattr(p, name).dtype)
                for p in parts
            ]
        )

    return EventBatch(
        click=col("click"),
        time=col("time"),
        key=col("key"),
        user=col("user"),
        keep=col("keep"),
        ids=mat("ids"),
        present=mat("present"),
        unknown=col("unknown"),
        orphan=lambda i: parts[i].orphan(0),
    )


CONFIGS = {
    "plain": {},
    "sampled+corrections": {"negative_rate": 0.5, "late_corrections": True},
    "at-close": {"positives_at_close": True, "late_corrections": True},
    "short-retention": {"retention_ms": 50, "idle_ms": 200},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("seed", range(6))
def test_batches_decide_exactly_as_one_event_at_a_time(name: str, seed: int) -> None:
    base: dict[str, Any] = {"slots": SLOTS, "window_ms": 100, "lateness_ms": 10, "idle_ms": 10**9}
    config = JoinConfig(**{**base, **CONFIGS[name]})
    run_both(config, events(seed), seed)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("seed", range(4))
def test_incremental_deltas_restore_the_exact_state(name: str, seed: int) -> None:
    """Cut anywhere, restore from the deltas written so far: the same decisions follow."""
    from pipeline.joiner import delta

    base: dict[str, Any] = {"slots": SLOTS, "window_ms": 100, "lateness_ms": 10, "idle_ms": 10**9}
    config = JoinConfig(**{**base, **CONFIGS[name]})
    evs = events(seed)
    rng = random.Random(seed)
    whole = PartitionJoiner(config, NOW)
    expected = [
        whole.process(_batch(evs[i : i + 5], i, config), NOW) for i in range(0, len(evs), 5)
    ]
    expected.append(whole.advance(NOW + 10**6))

    live = PartitionJoiner(config, NOW)
    deltas: list[bytes] = []
    got: list[JoinResult] = []
    cuts = sorted(rng.sample(range(0, len(evs), 5), 4))
    for i in range(0, len(evs), 5):
        got.append(live.process(_batch(evs[i : i + 5], i, config), NOW))
        if rng.random() < 0.3:  # a checkpoint round: only the changed rows
            rows = delta.take_changes(live, len(deltas) + 1)
            deltas.append(delta.encode_delta(live, rows, {"at": i, "seq": len(deltas) + 1}))
        if i in cuts:  # a crash right after a checkpoint: restore from all deltas
            rows = delta.take_changes(live, len(deltas) + 1)
            deltas.append(delta.encode_delta(live, rows, {"at": i, "seq": len(deltas) + 1}))
            needed = delta.oldest_needed(live, len(deltas))
            fresh = PartitionJoiner(config, NOW)
            assert delta.restore(fresh, deltas[needed - 1 :])["at"] == i
            assert fresh.counters == live.counters and fresh.watermark == live.watermark
            assert fresh.pending_count == live.pending_count
            assert fresh.remembered_count == live.remembered_count
            live = fresh
    got.append(live.advance(NOW + 10**6))
    assert batch_outputs(live, got) == batch_outputs(whole, expected)
    assert live.counters == whole.counters
