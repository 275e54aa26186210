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
    "EventBlock",
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

    def event_blocks(self, n: int) -> Iterator[EventBlock]:
        """The first ``n`` impressions and their clicks as columnar :class:`EventBlock` s.

        One block per internal generator block (512 requests), generated on the fly in
        O(block) memory: the impressions of that block and the clicks (of this or earlier
        blocks) due before the block's last impression time, so concatenating the blocks
        gives both streams in event-time order. A block's clicks are drawn from
        ``default_rng([seed, 2, block])``:

        * on time: a truncated exponential delay (mean ``mean_click_delay_ms``) within
          ``[1 ms, 0.9 * window]``;
        * late (``[1.1, 2.0] * window``): by a running quota, so that the first ``b``
          blocks hold exactly ``round(late_click_fraction * clicks so far)`` late
          clicks, for every ``b`` (the margins mean ``<`` and ``<=`` joiners agree);
        * ``duplicate_clicks`` extra copies of on-time clicks, spread evenly over the
          blocks (a block without an on-time click passes its share on), each later
          than the original but within 0.9 of the window.

        The ``malformed_events`` payloads ride on the first block. A block does not
        depend on ``n`` unless it is the last one (cut at ``n``), so ``event_blocks(n)``
        agrees with ``event_blocks(m)`` on every full block before the last.
        """
        c = self.config
        if n < 0:
            raise GeneratorError(f"need n >= 0, got {n}")
        per_block = _BLOCK_REQUESTS * c.items_per_request
        total_blocks = max(1, -(-n // per_block))
        malformed_rng = np.random.default_rng([c.seed, 3])
        malformed = [
            _malformed(j, malformed_rng, c.start_time_ms) for j in range(c.malformed_events)
        ]
        if n == 0:
            yield _empty_block(malformed)
            return
        pending = _Clicks.empty()
        clicks_seen = late_seen = dups_carried = 0
        done = 0
        for b, cols in enumerate(self._blocks()):
            size = min(len(cols["p"]), n - done)
            cols = {key: v[:size] for key, v in cols.items()}
            done += size
            last = done >= n
            rng = np.random.default_rng([c.seed, 2, b])
            clicked = np.flatnonzero(cols["click"])
            clicks_seen += len(clicked)
            late_n = min(
                len(clicked), max(0, round(c.late_click_fraction * clicks_seen) - late_seen)
            )
            late_seen += late_n
            dup_share = (b + 1) * c.duplicate_clicks // total_blocks
            dup_share -= b * c.duplicate_clicks // total_blocks
            wanted = dup_share + dups_carried
            new, delay, dups_carried = self._block_clicks(rng, cols, clicked, late_n, wanted)
            if last and dups_carried:
                raise GeneratorError("duplicate_clicks needs at least one on-time click; raise n")
            pending = pending.extend(new)
            due = len(pending) if last else pending.due_before(int(cols["time"][-1]))
            clicks, pending = pending.split(due)
            yield EventBlock(
                index=b,
                request=cols["request"],
                user=cols["user"],
                item=cols["item"],
                device=cols["device"],
                position=cols["position"],
                time=cols["time"],
                p=cols["p"].astype(np.float64),
                click_delay_ms=delay,
                click_request=clicks.request,
                click_user=clicks.user,
                click_item=clicks.item,
                click_time=clicks.time,
                late_clicks=late_n,
                duplicate_clicks=wanted - dups_carried,
                malformed=malformed if b == 0 else [],
            )
            if last:
                return

    def _block_clicks(
        self,
        rng: np.random.Generator,
        cols: dict[str, Any],
        clicked: I64,
        late_n: int,
        dups_wanted: int,
    ) -> tuple[_Clicks, I64, int]:
        """The clicks of one block (row order, duplicates last), each impression's first
        click delay (-1: none), and the duplicates passed on (no on-time click here)."""
        c, window = self.config, self.config.attribution_window_ms
        size = len(cols["p"])
        late = np.zeros(size, dtype=bool)
        late[rng.choice(clicked, late_n, replace=False)] = True
        delay = np.full(size, -1, dtype=np.int64)
        cap, mean = 0.9 * window, float(c.mean_click_delay_ms)
        u = rng.random(len(clicked))  # truncated exponential on [0, cap] by inverse CDF
        on_time = -mean * np.log1p(-u * -np.expm1(-cap / mean))
        delay[clicked] = np.maximum(np.floor(on_time), 1).astype(np.int64)
        delay[late] = np.floor(rng.uniform(1.1 * window, 2.0 * window, int(late.sum())))
        prompt = np.flatnonzero((delay >= 0) & ~late)
        carried = 0
        dups = np.zeros(0, dtype=np.int64)
        if dups_wanted and not len(prompt):
            carried = dups_wanted
        elif dups_wanted:
            dups = rng.choice(prompt, dups_wanted, replace=dups_wanted > len(prompt))
        rows = np.concatenate([clicked, dups]).astype(np.int64)
        times = cols["time"][rows] + delay[rows]
        if len(dups):
            times[len(clicked) :] = cols["time"][dups] + rng.integers(delay[dups], int(cap) + 1)
        order = np.argsort(times, kind="stable")
        rows, times = rows[order], times[order]
        clicks = _Clicks(cols["request"][rows], cols["user"][rows], cols["item"][rows], times)
        return clicks, delay, carried

    def events(self, n: int) -> EventLog:
        """The first ``n`` impressions as records, their clicks, and malformed payloads.

        The records of :meth:`event_blocks` (see there for click delays, late and
        duplicate clicks), built as dicts: ``pipeline.ingest.eventbytes`` encodes the
        same blocks straight to Avro bodies, for producing at high rates. Exactly
        ``round(late_click_fraction * clicks)`` clicks come late.
        """
        blocks = list(self.event_blocks(n))
        impressions: list[dict[str, Any]] = []
        clicks: list[dict[str, Any]] = []
        for block in blocks:
            impressions += self.impression_records(block)
            clicks += self.click_records(block)
        return EventLog(
            impressions=impressions,
            clicks=clicks,
            malformed=blocks[0].malformed,
            click_delay_ms=np.concatenate([b.click_delay_ms for b in blocks]),
            true_p=np.concatenate([b.p for b in blocks]),
            attribution_window_ms=self.config.attribution_window_ms,
            late_clicks=sum(b.late_clicks for b in blocks),
            duplicate_clicks=sum(b.duplicate_clicks for b in blocks),
        )

    def request_id(self, request: int) -> str:
        """The ``request_id`` of request number ``request``: ``r<seed>-<request>``."""
        return f"r{self.config.seed}-{request}"

    def impression_records(self, block: EventBlock) -> list[dict[str, Any]]:
        """The block's impressions as ``Impression`` records (dicts)."""
        index = self._index(
            {
                "user": block.user,
                "item": block.item,
                "device": block.device,
                "position": block.position,
            }
        )
        raw = {s: [self.raw_value(s, i) for i in index[s].tolist()] for s in SLOTS}
        requests = [self.request_id(r) for r in block.request.tolist()]
        times = block.time.tolist()
        return [
            {
                "request_id": requests[j],
                "user_id": raw["user_id"][j],
                "item_id": raw["item_id"][j],
                "event_time": times[j],
                "features": {s: raw[s][j] for s in SLOTS},
                "context": None,
            }
            for j in range(len(times))
        ]

    def click_records(self, block: EventBlock) -> list[dict[str, Any]]:
        """The block's clicks as ``Click`` records (dicts), in event-time order."""
        return [
            {
                "request_id": self.request_id(r),
                "user_id": self.raw_value("user_id", u),
                "item_id": self.raw_value("item_id", i),
                "event_time": t,
            }
            for r, u, i, t in zip(
                block.click_request.tolist(),
                block.click_user.tolist(),
                block.click_item.tolist(),
                block.click_time.tolist(),
                strict=True,
            )
        ]


@dataclass(frozen=True)
class EventBlock:
    """A slice of the event stream, columnar: one generator block's impressions and
    the clicks due before its last impression time (both in event-time order).

    Entity columns hold indices (``user`` 17 is ``"u17"``, see
    :meth:`TrafficGenerator.raw_value`); ``request`` is the request number of
    :meth:`TrafficGenerator.request_id`.
    """

    index: int  # the generator block
    request: I64
    user: I64
    item: I64
    device: I64
    position: I64  # 1-based
    time: I64  # event time, ms
    p: F64  # true click probability
    click_delay_ms: I64  # the impression's first-click delay, -1: none
    click_request: I64
    click_user: I64
    click_item: I64
    click_time: I64
    late_clicks: int  # of the clicks drawn in this block (they may be due later)
    duplicate_clicks: int
    malformed: list[MalformedEvent]

    @property
    def impressions(self) -> int:
        return len(self.time)

    @property
    def clicks(self) -> int:
        return len(self.click_time)


@dataclass(frozen=True)
class _Clicks:
    """Clicks drawn but not yet emitted, in event-time order (ties: drawn first, first)."""

    request: I64
    user: I64
    item: I64
    time: I64

    @staticmethod
    def empty() -> _Clicks:
        none = np.zeros(0, dtype=np.int64)
        return _Clicks(none, none, none, none)

    def __len__(self) -> int:
        return len(self.time)

    def extend(self, new: _Clicks) -> _Clicks:
        """Both sets merged in time order, this one first at equal times."""
        cols = [np.concatenate([a, b]) for a, b in zip(self._cols(), new._cols(), strict=True)]
        order = np.argsort(cols[3], kind="stable")
        return _Clicks(*(col[order] for col in cols))

    def due_before(self, time_ms: int) -> int:
        """How many clicks come strictly before ``time_ms``."""
        return int(np.searchsorted(self.time, time_ms, side="left"))

    def split(self, k: int) -> tuple[_Clicks, _Clicks]:
        cols = self._cols()
        return _Clicks(*(c[:k] for c in cols)), _Clicks(*(c[k:] for c in cols))

    def _cols(self) -> tuple[I64, I64, I64, I64]:
        return self.request, self.user, self.item, self.time


def _empty_block(malformed: list[MalformedEvent]) -> EventBlock:
    none, nothing = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    return EventBlock(
        0,
        none,
        none,
        none,
        none,
        none,
        none,
        nothing,
        none,
        none,
        none,
        none,
        none,
        0,
        0,
        malformed,
    )


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
