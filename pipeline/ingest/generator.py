"""Synthetic CTR traffic from a known ground-truth model, to judge online learning.

Requests arrive as a Poisson process (``rate`` impressions per second of event time);
each shows ``items_per_request`` distinct items to a Zipf-chosen user. The click
probability is ``sigmoid(bias + w_user + w_item(t) + w_category + w_device + w_position
+ <u_user, v_item>)``: wide logistic terms plus a low-rank user x item interaction.
Item CTRs (``w_item``) and item popularity drift sinusoidally with per-item phases, so a
model frozen in the past gets worse. Everything is a pure function of ``seed``.

Two outputs: :meth:`TrafficGenerator.samples` (SampleBatch + the true p of every row)
and :meth:`TrafficGenerator.events` (Impression/Click records with click delays, late
and duplicate clicks, and malformed payloads, for the joiner). See ``docs/datasets.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.codec import SampleBatch, SlotConfig, avro, hash64_many
from pipeline.codec.errors import CodecError
from pipeline.errors import PipelineError
from pipeline.ingest.adapters.base import Dataset, SlotIds, make_batch

__all__ = [
    "SLOTS",
    "EventLog",
    "GeneratorError",
    "MalformedEvent",
    "TrafficConfig",
    "TrafficGenerator",
    "exact_auc",
]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

#: Slots of generated samples; impressions carry the same names in ``features``.
SLOTS = ("user_id", "item_id", "category", "device", "position")
_PREFIX = {"user_id": "u", "item_id": "i", "category": "c", "position": ""}
_BLOCK_REQUESTS = 512  # requests per internal block: fixed, so output never depends on batching
_MALFORMED_KINDS = ("truncated", "trailing_bytes", "garbage", "empty")


class GeneratorError(PipelineError):
    """An invalid generator setting; the message names it."""


@dataclass(frozen=True)
class TrafficConfig:
    """Every knob of the synthetic traffic; the defaults give about 7% CTR, Bayes AUC 0.80."""

    seed: int = 0
    num_users: int = 5_000
    num_items: int = 1_000
    num_categories: int = 20
    devices: tuple[str, ...] = ("mobile", "desktop", "tablet")
    items_per_request: int = 3
    user_zipf: float = 1.05
    item_zipf: float = 1.1
    rate: float = 200.0  # impressions per second of event time
    start_time_ms: int = 1_700_000_000_000
    base_ctr: float = 0.05
    user_scale: float = 0.5  # std of the wide user weights
    item_scale: float = 0.5
    category_scale: float = 0.3
    rank: int = 4
    interaction_scale: float = 0.8  # std of <u_user, v_item>
    position_decay: float = 0.3  # logit penalty per position below the first
    drift_period_s: float = 3600.0
    ctr_drift: float = 1.0  # amplitude of the item-logit sinusoid
    popularity_drift: float = 1.5  # amplitude of the item log-popularity sinusoid
    attribution_window_ms: int = 600_000
    mean_click_delay_ms: int = 30_000
    late_click_fraction: float = 0.05
    duplicate_clicks: int = 0
    malformed_events: int = 0

    def __post_init__(self) -> None:
        positive = ("num_users", "num_items", "num_categories", "items_per_request", "rank")
        for name in positive:
            if getattr(self, name) < 1:
                raise GeneratorError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rate", "drift_period_s", "mean_click_delay_ms"):
            if not getattr(self, name) > 0:
                raise GeneratorError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.attribution_window_ms < 10:
            raise GeneratorError("attribution_window_ms must be >= 10")
        if self.items_per_request > self.num_items:
            raise GeneratorError("items_per_request must be <= num_items (items are distinct)")
        if not self.devices or len(set(self.devices)) != len(self.devices):
            raise GeneratorError("devices must be non-empty and distinct")
        if not 0 < self.base_ctr < 1:
            raise GeneratorError(f"base_ctr must be in (0, 1), got {self.base_ctr}")
        if not 0 <= self.late_click_fraction <= 1:
            raise GeneratorError("late_click_fraction must be in [0, 1]")
        if self.duplicate_clicks < 0 or self.malformed_events < 0:
            raise GeneratorError("duplicate_clicks and malformed_events must be >= 0")


@dataclass(frozen=True)
class MalformedEvent:
    """A payload a consumer must dead-letter, with the reason ``avro.decode`` gives."""

    topic: str  # logical topic: events.impressions or events.clicks
    data: bytes
    reason: str
    kind: str  # how it was broken: truncated, trailing_bytes, garbage, empty


@dataclass
class EventLog:
    """``n`` impressions, their clicks (time order) and malformed payloads, with the truth.

    ``click_delay_ms[j]`` is the delay of impression ``j``'s first click (-1: none);
    duplicates repeat an on-time click and never change which pairs are positive.
    """

    impressions: list[dict[str, Any]]
    clicks: list[dict[str, Any]]
    malformed: list[MalformedEvent]
    click_delay_ms: I64
    true_p: F64
    attribution_window_ms: int
    late_clicks: int = 0
    duplicate_clicks: int = 0

    def labels(self, window_ms: int | None = None) -> npt.NDArray[np.float32]:
        """Per impression: 1 when its first click came within ``window_ms`` (inclusive)."""
        window = self.attribution_window_ms if window_ms is None else window_ms
        d = self.click_delay_ms
        return ((d >= 0) & (d <= window)).astype(np.float32)

    def positives(self, window_ms: int | None = None) -> set[tuple[str, str]]:
        """The (request_id, item_id) pairs a joiner with this window must label 1."""
        labels = self.labels(window_ms).tolist()
        return {
            (i["request_id"], i["item_id"])
            for i, y in zip(self.impressions, labels, strict=True)
            if y
        }


def exact_auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half; exact."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape or not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0/1 and as many as the scores")
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mid_ranks = ends - (counts - 1) / 2.0  # 1-based average rank of each tie group
    rank_sum = float(mid_ranks[inverse][y == 1].sum())
    return (rank_sum - pos * (pos + 1) / 2.0) / (pos * neg)


def _zipf_cdf(n: int, a: float) -> F64:
    weights = (np.arange(n, dtype=np.float64) + 1.0) ** -a
    return np.cumsum(weights) / weights.sum()


def _draw(cdf: F64, u: F64) -> I64:
    """Inverse-CDF sampling: indices for uniform draws ``u``."""
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1).astype(np.int64)


class TrafficGenerator:
    """The ground-truth model plus the traffic it generates (deterministic in the seed)."""

    def __init__(self, config: TrafficConfig | None = None, **overrides: Any) -> None:
        try:
            self.config = dataclasses.replace(config or TrafficConfig(), **overrides)
        except TypeError as exc:
            raise GeneratorError(f"unknown generator setting: {exc}") from None
        c = self.config
        rng = np.random.default_rng([c.seed, 0])
        self.bias = math.log(c.base_ctr / (1 - c.base_ctr))
        self.w_user = rng.normal(0, c.user_scale, c.num_users)
        self.w_item = rng.normal(0, c.item_scale, c.num_items)
        self.w_category = rng.normal(0, c.category_scale, c.num_categories)
        self.w_device = rng.normal(0, 0.2, len(c.devices))
        sigma = math.sqrt(c.interaction_scale / math.sqrt(c.rank))
        self.u = rng.normal(0, sigma, (c.num_users, c.rank))
        self.v = rng.normal(0, sigma, (c.num_items, c.rank))
        self.item_category = rng.integers(0, c.num_categories, c.num_items)
        self.ctr_phase = rng.uniform(0, 2 * math.pi, c.num_items)
        self.pop_phase = rng.uniform(0, 2 * math.pi, c.num_items)
        self.slot_config = SlotConfig(SLOTS, 0)
        self._user_cdf = _zipf_cdf(c.num_users, c.user_zipf)
        self._device_cdf = _zipf_cdf(len(c.devices), 1.0)

    # -- the ground truth -------------------------------------------------------------

    def _wave(self, phase: F64, time_ms: npt.ArrayLike) -> F64:
        t = (np.asarray(time_ms, dtype=np.float64) - self.config.start_time_ms) / 1000.0
        return np.sin(2 * math.pi * t / self.config.drift_period_s + phase)

    def item_logit(self, items: npt.ArrayLike, time_ms: npt.ArrayLike) -> F64:
        """The drifting wide item term ``w_item(t)`` of ``items`` at ``time_ms``."""
        i = np.asarray(items, dtype=np.int64)
        return self.w_item[i] + self.config.ctr_drift * self._wave(self.ctr_phase[i], time_ms)

    def item_popularity(self, time_ms: int) -> F64:
        """P(item shown) at ``time_ms``: Zipf by item index, times a drifting factor."""
        c = self.config
        ranks = np.arange(c.num_items, dtype=np.float64) + 1.0
        logw = -c.item_zipf * np.log(ranks) + c.popularity_drift * self._wave(
            self.pop_phase, time_ms
        )
        w = np.exp(logw - logw.max())
        return w / w.sum()

    def probability(
        self, users: I64, items: I64, devices: I64, positions: I64, time_ms: I64
    ) -> F64:
        """The true click probability of each impression (positions start at 1)."""
        logit = (
            self.bias
            + self.w_user[users]
            + self.item_logit(items, time_ms)
            + self.w_category[self.item_category[items]]
            + self.w_device[devices]
            - self.config.position_decay * (positions - 1)
            + np.einsum("ij,ij->i", self.u[users], self.v[items])
        )
        return 1.0 / (1.0 + np.exp(-logit))

    # -- traffic ----------------------------------------------------------------------

    def _blocks(self) -> Iterator[dict[str, Any]]:
        """Impressions, endlessly, in blocks of ``_BLOCK_REQUESTS`` requests (time order)."""
        c, k = self.config, self.config.items_per_request
        now = float(c.start_time_ms)
        for b in itertools.count():
            rng = np.random.default_rng([c.seed, 1, b])
            gaps = rng.exponential(1000.0 * k / c.rate, _BLOCK_REQUESTS)
            req_times = now + np.cumsum(gaps)
            now = float(req_times[-1])
            cdf = np.cumsum(self.item_popularity(int((req_times[0] + now) / 2)))
            items = self._distinct_items(rng, cdf, _BLOCK_REQUESTS)
            users = _draw(self._user_cdf, rng.random(_BLOCK_REQUESTS))
            devices = _draw(self._device_cdf, rng.random(_BLOCK_REQUESTS))
            times = np.floor(req_times).astype(np.int64)
            block: dict[str, Any] = {
                "request": np.repeat(b * _BLOCK_REQUESTS + np.arange(_BLOCK_REQUESTS), k),
                "user": np.repeat(users, k),
                "item": items.ravel(),
                "device": np.repeat(devices, k),
                "position": np.tile(np.arange(1, k + 1), _BLOCK_REQUESTS),
                "time": np.repeat(times, k),
            }
            block["p"] = self.probability(
                block["user"], block["item"], block["device"], block["position"], block["time"]
            )
            block["click"] = rng.random(len(block["p"])) < block["p"]
            yield block

    def _distinct_items(self, rng: np.random.Generator, cdf: F64, requests: int) -> I64:
        """``(requests, k)`` item indices drawn from ``cdf``, distinct within each request."""
        k = self.config.items_per_request
        items = _draw(cdf, rng.random((requests, k)))
        for _ in range(20):
            srt = np.sort(items, axis=1)
            dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
            if not dup.any():
                return items
            items[dup] = _draw(cdf, rng.random((int(dup.sum()), k)))
        probs = np.diff(cdf, prepend=0.0)
        for r in np.flatnonzero((np.sort(items, 1)[:, 1:] == np.sort(items, 1)[:, :-1]).any(1)):
            items[r] = rng.choice(len(cdf), k, replace=False, p=probs / probs.sum())
        return items

    def _take(self, n: int, batch_rows: int) -> Iterator[dict[str, Any]]:
        """The first ``n`` impressions as column dicts of ``batch_rows`` rows (last shorter)."""
        if n < 0 or batch_rows < 1:
            raise GeneratorError(f"need n >= 0 and batch_rows >= 1, got {n}, {batch_rows}")
        pending: list[dict[str, Any]] = []
        held = done = 0
        blocks = self._blocks()
        while done < n:
            while held < min(batch_rows, n - done):
                block = next(blocks)
                pending.append(block)
                held += len(block["p"])
            merged = {key: np.concatenate([p[key] for p in pending]) for key in pending[0]}
            size = min(batch_rows, n - done)
            yield {key: v[:size] for key, v in merged.items()}
            pending = [{key: v[size:] for key, v in merged.items()}]
            held -= size
            done += size

    def raw_value(self, slot: str, index: int) -> str:
        """The raw feature string of entity ``index`` in ``slot`` (as impressions carry it)."""
        if slot == "device":
            return self.config.devices[index]
        return f"{_PREFIX[slot]}{index}"

    @cached_property
    def _ids(self) -> dict[str, npt.NDArray[np.uint64]]:
        """Feature ids of every user, item, category, device and position, hashed once."""
        c = self.config
        sizes = (c.num_users, c.num_items, c.num_categories, len(c.devices))
        counts = dict(zip(SLOTS, (*sizes, c.items_per_request + 1), strict=True))
        return {s: hash64_many(s, (self.raw_value(s, i) for i in range(counts[s]))) for s in SLOTS}

    def _index(self, cols: dict[str, Any]) -> dict[str, I64]:
        """Entity index of every slot for a column block."""
        return {
            "user_id": cols["user"],
            "item_id": cols["item"],
            "category": self.item_category[cols["item"]],
            "device": cols["device"],
            "position": cols["position"],
        }

    def samples(self, n: int, batch_rows: int = 1024) -> Iterator[tuple[SampleBatch, F64]]:
        """The first ``n`` impressions as (SampleBatch, true p per row); label = clicked."""
        ids = self._ids
        for cols in self._take(n, batch_rows):
            index = self._index(cols)
            ones = np.ones(len(cols["p"]), dtype=np.int64)
            slot_ids = [SlotIds(ones, ids[s][index[s]]) for s in SLOTS]
            batch = make_batch(self.slot_config, cols["click"], cols["time"], slot_ids)
            yield batch, cols["p"]

    def bayes_auc(self, n: int = 100_000) -> float:
        """AUC of the true probabilities against the sampled clicks of the first ``n``."""
        cols = next(self._take(n, n))
        return exact_auc(cols["click"], cols["p"])

    def dataset(self, n: int) -> Dataset:
        """The first ``n`` samples as a :class:`Dataset` (for code that takes any dataset)."""
        return _SyntheticDataset(self, n)

    def events(self, n: int) -> EventLog:
        """The first ``n`` impressions as records, their clicks, and malformed payloads.

        Exactly ``round(late_click_fraction * clicks)`` clicks come 1.1-2x the attribution
        window late; the others within 0.9x of it (a margin either side, so ``<`` and
        ``<=`` joiners agree). ``duplicate_clicks`` repeat random on-time clicks.
        """
        c, window = self.config, self.config.attribution_window_ms
        cols = next(self._take(n, max(n, 1))) if n else {k: np.zeros(0, np.int64) for k in _COLS}
        rng = np.random.default_rng([c.seed, 2])
        requests = [f"r{c.seed}-{r}" for r in cols["request"].tolist()]
        index = self._index(cols)
        raw = {s: [self.raw_value(s, i) for i in index[s].tolist()] for s in SLOTS}
        users, items, times = raw["user_id"], raw["item_id"], cols["time"].tolist()
        impressions = [
            {
                "request_id": requests[j],
                "user_id": users[j],
                "item_id": items[j],
                "event_time": times[j],
                "features": {s: raw[s][j] for s in SLOTS},
                "context": None,
            }
            for j in range(n)
        ]
        clicked = np.flatnonzero(cols["click"])
        late = np.zeros(n, dtype=bool)
        late[rng.choice(clicked, round(c.late_click_fraction * len(clicked)), replace=False)] = True
        delay = np.full(n, -1, dtype=np.int64)
        cap, mean = 0.9 * window, float(c.mean_click_delay_ms)
        u = rng.random(len(clicked))  # truncated exponential on [0, cap] by inverse CDF
        on_time = -mean * np.log1p(-u * -np.expm1(-cap / mean))
        delay[clicked] = np.maximum(np.floor(on_time), 1).astype(np.int64)
        delay[late] = np.floor(rng.uniform(1.1 * window, 2.0 * window, int(late.sum())))
        click_rows = clicked.tolist()
        click_times = [times[j] + int(delay[j]) for j in click_rows]
        prompt = np.flatnonzero((delay >= 0) & ~late)
        if c.duplicate_clicks and not len(prompt):
            raise GeneratorError("duplicate_clicks needs at least one on-time click; raise n")
        dups = rng.choice(prompt, c.duplicate_clicks, replace=c.duplicate_clicks > len(prompt))
        for j in dups.tolist():
            click_rows.append(j)
            click_times.append(times[j] + int(rng.integers(delay[j], int(cap) + 1)))
        order = np.argsort(np.asarray(click_times, dtype=np.int64), kind="stable").tolist()
        clicks = [
            {
                "request_id": requests[click_rows[o]],
                "user_id": users[click_rows[o]],
                "item_id": items[click_rows[o]],
                "event_time": click_times[o],
            }
            for o in order
        ]
        return EventLog(
            impressions=impressions,
            clicks=clicks,
            malformed=[_malformed(j, rng, c.start_time_ms) for j in range(c.malformed_events)],
            click_delay_ms=delay,
            true_p=cols["p"].astype(np.float64),
            attribution_window_ms=window,
            late_clicks=int(late.sum()),
            duplicate_clicks=c.duplicate_clicks,
        )


_COLS = ("request", "user", "item", "device", "position", "time", "p", "click")


def _malformed(j: int, rng: np.random.Generator, time_ms: int) -> MalformedEvent:
    """Malformed payload ``j``: a broken Impression (even j) or Click (odd j)."""
    impression = j % 2 == 0
    schema = "Impression" if impression else "Click"
    topic = "events.impressions" if impression else "events.clicks"
    record: dict[str, Any] = {
        "request_id": f"bad-{j}",
        "user_id": "u0",
        "item_id": "i0",
        "event_time": time_ms,
    }
    if impression:
        record |= {"features": {"device": "mobile"}, "context": None}
    valid = avro.encode(schema, record)
    kind = _MALFORMED_KINDS[(j // 2) % len(_MALFORMED_KINDS)]
    for _ in range(1000):
        if kind == "truncated":
            data = valid[: len(valid) // 2]
        elif kind == "trailing_bytes":
            data = valid + rng.bytes(int(rng.integers(1, 9)))
        elif kind == "garbage":
            data = rng.bytes(int(rng.integers(8, 64)))
        else:
            data = b""
        try:
            avro.decode(schema, data)
        except CodecError as exc:
            return MalformedEvent(topic=topic, data=data, reason=exc.reason, kind=kind)
    raise AssertionError(f"could not build a malformed {kind} payload")  # pragma: no cover


class _SyntheticDataset(Dataset):
    """``TrafficGenerator.samples`` behind the :class:`Dataset` interface."""

    def __init__(self, generator: TrafficGenerator, n: int) -> None:
        super().__init__(f"synthetic:seed={generator.config.seed}", generator.slot_config)
        self._generator, self._n = generator, n

    def _blocks(self, chunk_rows: int) -> Generator[SampleBatch, None, None]:
        for batch, _ in self._generator.samples(self._n, chunk_rows):
            yield batch
