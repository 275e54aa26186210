"""The training loop: passes of batches through the device cache, in three overlapped stages.

Stages: **IO** (the dataset's reader thread consumes and decodes into a queue),
**communication** (one worker thread pulls the next pass's missing rows and
pushes the previous pass's updates, in that order), **compute** (this thread:
torch forward, progressive metrics, backward, dense optimizer step). Time spent
by compute waiting on the other two says which stage limits throughput
(:attr:`StageTimes.limiting`).

Modes (``TrainerSettings.mode``):

- ``async``: a pass's gradients are summed per id and pushed at pass end; the
  next pass's rows were pulled while this one trained, so sparse rows are at
  most about two passes stale; pushes are bounded by ``max_inflight``.
- ``geo``: local Adagrad steps on the cached rows during the pass, parameter
  deltas pushed at pass end; rows stay cached ``max_age_passes`` passes.
- ``sync``: one batch per pass; pull, train, push, wait until applied. With one
  trainer this is exactly the in-process reference (:class:`LocalBackend`).

Offsets: a pass's Kafka positions are committed only once every push of that
pass (and of the passes before it) is applied by the shard servers.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

from pipeline.arrayops import unique as distinct
from pipeline.codec.samplebatch import SampleBatch
from pipeline.errors import PipelineError
from pipeline.model.features import BatchIds, SparseInput, batch_ids
from pipeline.model.modules import CTRModel, build_model, set_output_bias
from pipeline.model.spec import ModelSpec
from pipeline.ps.spec import TableSpec
from pipeline.train.backend import SparseBackend
from pipeline.train.cache import DeviceCache, Plan
from pipeline.train.dataset import Source, TrainBatch
from pipeline.train.dense_opt import dense_optimizer
from pipeline.train.dense_sync import DenseSync
from pipeline.train.metrics import WindowedMetrics
from pipeline.train.settings import TrainerSettings

__all__ = [
    "BatchSource",
    "IterSource",
    "RowSource",
    "StageTimes",
    "TrainResult",
    "Trainer",
    "pick_device",
]

log = logging.getLogger(__name__)

U64 = npt.NDArray[np.uint64]
F32 = npt.NDArray[np.float32]


class BatchSource(Protocol):
    """Where batches come from: QueueDataset, or an iterator wrapped in IterSource."""

    def get(self, timeout: float) -> TrainBatch | None: ...


class IterSource:
    """A finite iterable of TrainBatch (InMemoryDataset, files) as a BatchSource."""

    def __init__(self, batches: Iterable[TrainBatch]) -> None:
        self._it: Iterator[TrainBatch] = iter(batches)
        self.exhausted = False

    def get(self, timeout: float) -> TrainBatch | None:
        if self.exhausted:
            return None
        try:
            return next(self._it)
        except StopIteration:
            self.exhausted = True
            return None


class RowSource:
    """Rows in memory cut into batches on demand, at the size the trainer's schedule asks.

    The in-process counterpart of :class:`~pipeline.train.dataset.QueueDataset` for
    files, benchmarks and tests: ``set_batch_rows`` changes the size of the next batch.
    """

    def __init__(self, rows: SampleBatch, batch_rows: int = 1024) -> None:
        self._rows = rows
        self._next = 0
        self.batch_rows = batch_rows
        self.exhausted = rows.num_rows == 0

    def set_batch_rows(self, rows: int) -> None:
        self.batch_rows = rows

    def get(self, timeout: float) -> TrainBatch | None:
        if self._next >= self._rows.num_rows:
            self.exhausted = True
            return None
        stop = min(self._next + self.batch_rows, self._rows.num_rows)
        batch = self._rows.slice(self._next, stop)
        self._next = stop
        return TrainBatch(batch, (), 0)


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"device {name!r} requested but torch sees no CUDA device")
    return torch.device(name)


@dataclass
class StageTimes:
    """Seconds the compute thread spent computing vs waiting on IO and communication."""

    compute: float = 0.0
    wait_io: float = 0.0
    wait_comm: float = 0.0

    @property
    def limiting(self) -> str:
        parts = {"compute": self.compute, "io": self.wait_io, "communication": self.wait_comm}
        return max(parts, key=lambda k: parts[k])


@dataclass
class TrainResult:
    """What a run did (also the source of the benchmark and test checks)."""

    rows: int = 0
    batches: int = 0
    passes: int = 0
    dead_letters: int = 0
    #: dead-lettered messages by reason (filled in by the trainer role from its dataset)
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    #: wall-clock time (``time.time()``) of the first and last trained batch: comparable
    #: across trainer processes, so a group's throughput is rows / (last - first)
    first_row_at: float = 0.0
    last_row_at: float = 0.0
    #: sparse rows pulled and pushed (ids, all tables), and the unique ids of every batch
    #: summed over tables (what pulling per batch without the device cache would move)
    pulled_keys: int = 0
    pushed_keys: int = 0
    batch_lookups: int = 0
    predictions: list[F32] = field(default_factory=list)
    labels: list[F32] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Pass:
    number: int
    items: list[TrainBatch]
    ids: list[BatchIds | None]
    unique: U64
    #: per batch, the positions of its unique ids in ``unique`` (None: a single batch,
    #: whose unique ids are the pass's)
    local: list[npt.NDArray[np.int64] | None]
    plans: dict[str, Plan] = field(default_factory=dict)
    pulled: Future[dict[str, tuple[F32, npt.NDArray[np.bool_]]]] | None = None


@dataclass
class _Pending:
    receipts: list[Any]
    completes: list[Source]


class Trainer:
    """Trains one model against a sparse backend, pass by pass, from a BatchSource."""

    def __init__(
        self,
        spec: ModelSpec,
        tables: Mapping[str, TableSpec],
        backend: SparseBackend,
        settings: TrainerSettings,
        *,
        trainer_id: str = "trainer-0",
        device: torch.device | None = None,
        metrics: WindowedMetrics | None = None,
        commit: Callable[[Mapping[tuple[str, int], int]], object] | None = None,
        keep_predictions: bool = False,
    ) -> None:
        spec.check(tables)
        self.spec = spec
        self.settings = settings
        self.backend = backend
        self.trainer_id = trainer_id
        self.device = device or pick_device(settings.device)
        self.mode = settings.mode
        self.schedule = settings.schedule()
        self.stage = self.schedule.stage(0)
        self.pass_batches = self.stage.pass_batches
        self.prefetch = not self.stage.synchronous
        #: the job's trained rows (all trainers), polled at most once a second; the
        #: schedule's age is the larger of this and this trainer's own rows
        self.stream_age: Callable[[], int] | None = None
        self._job_rows = 0
        self._age_polled = 0.0
        self._source_rows: int | None = None  # the batch size last given to the source
        torch.manual_seed(settings.seed)
        self.model: CTRModel = build_model(spec, seed=settings.seed).to(self.device)
        self.model.train()
        self.optimizer = dense_optimizer(spec, self.model)
        self._dense_params = list(self.model.parameters())
        self.dims = spec.tables()
        self._max_age = settings.max_age_passes if self.mode != "sync" else 0
        max_age = 0 if self.stage.synchronous else self._max_age
        self.caches = {
            name: DeviceCache(
                name,
                dim,
                settings.cache_rows,
                self.device,
                max_age_passes=max_age,
                with_state=self.mode == "geo",
            )
            for name, dim in self.dims.items()
        }
        self.dense = DenseSync(
            backend,
            spec.dense_table_name(),
            self.model,
            settings.dense_sync_steps,
            settings.dense_sync_min_s,
        )
        self.metrics = metrics or WindowedMetrics(window_s=settings.metrics_window_s)
        self.stages = StageTimes()
        self.result = TrainResult()
        self._commit = commit
        self._keep = keep_predictions
        self._comm = ThreadPoolExecutor(1, thread_name_prefix="trainer-comm")
        self._pending: deque[_Pending] = deque()
        self._push_futures: deque[Future[None]] = deque()
        self._committed: dict[tuple[str, int], int] = {}
        self._step = 0
        self._started = False
        self._stop = threading.Event()
        self._holding = False  # the source is held for a snapshot cut
        # drain requests (revocation hooks, other threads) against drains done by the
        # loop; once the loop has ended (``_exited``) nothing is left to drain
        self._drain_cond = threading.Condition()
        self._drains_asked = 0
        self._drains_done = 0
        self._exited = False
        self.on_window: Callable[[Any], None] | None = None
        #: takes part in snapshots between passes (pipeline.snapshot.participant)
        self.participant: Any = None

    # -- control -----------------------------------------------------------
    def stop(self) -> None:
        """Finish the pass in hand, push, wait until applied, commit, then return from run()."""
        self._stop.set()

    def request_drain(self, timeout_s: float = 120.0) -> None:
        """Rebalance hook (QueueDataset on_revoke): block until all taken batches are committed.

        The loop drains between passes. When it has ended (a stop, an error) or ends
        meanwhile, its last flush committed everything it trained, so this returns
        then instead of waiting for a loop that will never drain again.
        """
        with self._drain_cond:
            if self._exited:
                return
            self._drains_asked += 1
            ticket = self._drains_asked
            done = self._drain_cond.wait_for(
                lambda: self._exited or self._drains_done >= ticket, timeout_s
            )
        if not done:
            log.error(
                "trainer did not drain within %.0f s before partitions were revoked", timeout_s
            )

    @property
    def _drain_wanted(self) -> bool:
        with self._drain_cond:
            return self._drains_done < self._drains_asked

    # -- the loop ----------------------------------------------------------
    def start(self, first: TrainBatch | None = None) -> None:
        """Initialize the output bias, then load (or publish) the shared dense parameters."""
        if self._started:
            return
        self._started = True
        if self.spec.bias_init is not None:
            set_output_bias(self.model, self.spec.bias_init)
        elif first is not None and first.batch is not None and first.batch.num_rows:
            # the running CTR: a trainer that starts first spares the model learning it.
            # Weighted (downsampled negatives count 1/rate) and smoothed by half a click
            # in one row, so a small first batch without clicks starts near, not at, 0
            batch = first.batch
            weights = np.asarray(batch.weights, np.float64)
            clicks = float(np.dot(weights, np.asarray(batch.labels, np.float64)))
            ctr = float(np.clip((clicks + 0.5) / (weights.sum() + 1.0), 1e-4, 1 - 1e-4))
            set_output_bias(self.model, math.log(ctr / (1 - ctr)))
        self.dense.start()  # a trainer that is not first adopts the shared values

    def run(
        self,
        source: BatchSource,
        *,
        max_rows: int | None = None,
        idle_timeout_s: float | None = None,
        poll_s: float = 0.1,
        on_progress: Callable[[Trainer], None] | None = None,
    ) -> TrainResult:
        """Train until the source ends (IterSource), ``stop()``, ``max_rows``, or idleness."""
        t0 = time.perf_counter()
        with self._drain_cond:
            self._exited = False
        try:
            return self._run(source, max_rows, idle_timeout_s, poll_s, on_progress, t0)
        finally:
            with self._drain_cond:  # a revocation waiting on us returns now
                self._exited = True
                self._drain_cond.notify_all()

    def _run(
        self,
        source: BatchSource,
        max_rows: int | None,
        idle_timeout_s: float | None,
        poll_s: float,
        on_progress: Callable[[Trainer], None] | None,
        t0: float,
    ) -> TrainResult:
        idle_since = time.monotonic()
        current: _Pass | None = None
        while True:
            if current is None:
                if self._drain_wanted:
                    self._finish_drain(source)
                if self._finished(source, idle_since, idle_timeout_s):
                    break
                if self.participant is not None and self._started:
                    self.participant.poll(self, source)
                    self._hold_for_cut(source)
                self._follow_schedule(source)
                current = self._assemble(source, poll_s)
                if current is None:
                    # idle: commit the passes applied meanwhile, so lag reaches 0
                    self._poll_commits()
                    if on_progress is not None:
                        on_progress(self)  # idle ticks too: metrics sinks stay current
                    continue
                self.start(current.items[0])
                self._prefetch(current)
            idle_since = time.monotonic()
            slots = self._install(current)
            # read the next pass ahead so its rows are pulled while this one trains
            upcoming = None
            cut = self._hold_for_cut(source)
            self._follow_schedule(source)
            if self.prefetch and not self._stop.is_set() and not self._drain_wanted and not cut:
                upcoming = self._assemble(source, 0.0)
                if upcoming is not None:
                    self._prefetch(upcoming)
            self._train_pass(current, slots)
            self._poll_commits()
            if on_progress is not None:
                on_progress(self)
            if max_rows is not None and self.result.rows >= max_rows:
                self._stop.set()
            current = upcoming
        self._flush_all()
        self.result.seconds = time.perf_counter() - t0
        self.result.committed = dict(self._committed)
        self.result.pulled_keys = sum(c.stats.pulled for c in self.caches.values())
        self.result.batch_lookups = sum(c.stats.lookups for c in self.caches.values())
        return self.result

    def close(self) -> None:
        self._comm.shutdown(wait=True)

    def cache_hit_rate(self) -> float:
        """Over every table: 1 - pulled rows / per-batch unique-id lookups."""
        lookups = sum(c.stats.lookups for c in self.caches.values())
        pulled = sum(c.stats.pulled for c in self.caches.values())
        return 1.0 - pulled / lookups if lookups else 0.0

    def flush(self) -> None:
        """Push what is trained, wait until applied, commit its offsets, merge dense params."""
        self._flush_all()

    @property
    def committed(self) -> dict[tuple[str, int], int]:
        """Next offset per (topic, partition) of everything trained and applied so far."""
        return dict(self._committed)

    def age_rows(self) -> int:
        """Rows the job has trained: the schedule's clock."""
        if self.stream_age is not None and time.monotonic() - self._age_polled >= 1.0:
            self._age_polled = time.monotonic()
            self._job_rows = max(self._job_rows, self.stream_age())
        return max(self.result.rows, self._job_rows)

    def _follow_schedule(self, source: BatchSource) -> None:
        """Move to the schedule's stage for the current age (batch size, pass, synchrony).

        The source cuts the next batches at the new size; batches it already cut keep
        theirs. Leaving the synchronous stages, pulls start to run a pass ahead.
        """
        stage = self.schedule.stage(self.age_rows()) if self.schedule.grows else self.stage
        resize = getattr(source, "set_batch_rows", None)
        if resize is not None and self._source_rows != stage.batch_rows:
            resize(stage.batch_rows)
            self._source_rows = stage.batch_rows
        if stage == self.stage:
            return
        log.info(
            "step schedule: stage %d at %d rows: %d rows per step, %d per pass, %s",
            stage.number,
            self.age_rows(),
            stage.batch_rows,
            stage.pass_batches,
            "synchronous" if stage.synchronous else self.mode,
        )
        self.stage = stage
        self.pass_batches = stage.pass_batches
        self.prefetch = not stage.synchronous
        for cache in self.caches.values():
            cache.max_age_passes = 0 if stage.synchronous else self._max_age

    def _finished(
        self, source: BatchSource, idle_since: float, idle_timeout_s: float | None
    ) -> bool:
        if self._stop.is_set() or getattr(source, "exhausted", False):
            return True
        return idle_timeout_s is not None and time.monotonic() - idle_since > idle_timeout_s

    def _assemble(self, source: BatchSource, timeout: float) -> _Pass | None:
        items: list[TrainBatch] = []
        t = time.perf_counter()
        first = source.get(timeout)
        self.stages.wait_io += time.perf_counter() - t
        if first is None:
            return None
        items.append(first)
        while len(items) < self.pass_batches:
            nxt = source.get(0.0)
            if nxt is None:
                break
            items.append(nxt)
        ids = [
            batch_ids(it.batch, self.spec.slots) if it.batch is not None else None for it in items
        ]
        parts = [b.unique for b in ids if b is not None]
        local: list[npt.NDArray[np.int64] | None]
        if len(parts) == 1:
            unique = parts[0]  # one batch: its unique ids are the pass's
            local = [None] * len(items)
        else:
            unique = distinct(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
            local = [None if b is None else np.searchsorted(unique, b.unique) for b in ids]
        self.result.passes += 1
        return _Pass(self.result.passes, items, ids, unique, local)

    def _prefetch(self, p: _Pass) -> None:
        p.plans = {name: cache.plan(p.unique, p.number) for name, cache in self.caches.items()}
        needs = {name: plan.need for name, plan in p.plans.items()}

        def pull() -> dict[str, tuple[F32, npt.NDArray[np.bool_]]]:
            out = {}
            for name, need in needs.items():
                weights, found = self.backend.pull(name, need)
                out[name] = (weights, found)
            return out

        p.pulled = self._comm.submit(pull) if self.prefetch else _done(pull())

    # -- one pass ----------------------------------------------------------
    def _install(self, p: _Pass) -> dict[str, npt.NDArray[np.int64]]:
        """Wait for the pass's pulls, write them into the caches; cache slots of its ids."""
        assert p.pulled is not None
        t = time.perf_counter()
        pulled = p.pulled.result()
        self.stages.wait_comm += time.perf_counter() - t
        t = time.perf_counter()
        pass_slots = {}
        for name, cache in self.caches.items():
            weights, found = pulled[name]
            pass_slots[name] = cache.install(p.plans[name], weights, found)
        self.stages.compute += time.perf_counter() - t
        return pass_slots

    def _train_pass(self, p: _Pass, pass_slots: Mapping[str, npt.NDArray[np.int64]]) -> None:
        t = time.perf_counter()
        u = len(p.unique)
        shows = np.zeros(u, np.float32)
        clicks = np.zeros(u, np.float32)
        grads: dict[str, list[tuple[npt.NDArray[np.int64] | None, torch.Tensor]]] = {
            name: [] for name in self.dims
        }
        max_event_time = 0
        lookups = 0
        for item, ids, local in zip(p.items, p.ids, p.local, strict=True):
            if item.batch is None or ids is None:
                self.result.dead_letters += 1
                continue
            batch = item.batch
            lookups += ids.num_unique  # what a cache-less trainer would pull
            rows = {
                name: slots if local is None else slots[local] for name, slots in pass_slots.items()
            }
            batch_grads = self._step_batch(batch, ids, rows)
            # a batch's unique ids map to distinct pass positions: plain indexed adds
            at = slice(None) if local is None else local
            shows[at] += ids.occurrences()
            clicks[at] += ids.clicks(batch.labels)
            for name, g in batch_grads.items():
                grads[name].append((local, g))
            if len(batch.event_times):
                max_event_time = max(max_event_time, int(np.max(batch.event_times)))
        for cache in self.caches.values():
            cache.stats.lookups += lookups
        self.result.batches += len(p.items)
        completes = [src for item in p.items for src in item.completes]
        kind = "delta" if self.mode == "geo" else "grad"
        payload = {}
        for name in self.caches:
            if self.mode == "geo":
                values = self.caches[name].take_deltas(pass_slots[name])
            else:
                values = _pass_sum(grads[name], u, self.dims[name], self.device)
            payload[name] = values
        self.stages.compute += time.perf_counter() - t
        offsets = _offset_map(completes)
        unique = p.unique
        self.result.pushed_keys += len(unique) * len(payload)

        def push() -> None:
            receipts = [
                self.backend.push(
                    name, unique, values, shows, clicks, kind, max_event_time, offsets
                )
                for name, values in payload.items()
                if len(unique)
            ]
            self._pending.append(_Pending(receipts, completes))

        if not self.stage.synchronous:
            self._push_futures.append(self._comm.submit(push))
            return
        # synchronous: push on this thread, which waits for the apply next anyway
        t = time.perf_counter()
        push()
        self._flush_all(dense=False)
        self.stages.wait_comm += time.perf_counter() - t

    def _step_batch(
        self, batch: Any, ids: BatchIds, rows: Mapping[str, npt.NDArray[np.int64]]
    ) -> dict[str, torch.Tensor]:
        """Score (progressive validation), then train on one batch; per-table row grads."""
        dev = self.device
        index = torch.from_numpy(ids.index).to(dev)
        offsets = torch.from_numpy(ids.offsets).to(dev)
        one_hot = ids.one_hot
        bags = None if one_hot else torch.from_numpy(ids.bags).to(dev)
        slots_t = {}
        inputs = {}
        for name, cache in self.caches.items():
            slots = torch.from_numpy(rows[name]).to(dev)
            slots_t[name] = slots
            leaf = cache.weight.index_select(0, slots).requires_grad_(True)
            inputs[name] = SparseInput(
                leaf, index, offsets, ids.num_rows, ids.num_slots, bags, one_hot
            )
        dense = _tensor(batch.dense, dev)
        labels = _tensor(batch.labels, dev)
        weights = _tensor(batch.weights, dev)
        logits = self.model(inputs, dense)
        preds = torch.sigmoid(logits.detach()).cpu().numpy()
        labels_np = np.asarray(batch.labels, np.float32)
        self.metrics.update(preds, labels_np, batch.weights, batch.event_times)
        if self._keep:
            self.result.predictions.append(preds)
            self.result.labels.append(labels_np)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, labels, weight=weights, reduction="sum"
        )
        for param in self._dense_params:
            param.grad = None
        loss.backward()
        # sparse rows take the summed loss's gradient; dense parameters its mean's
        dense_grads = [p.grad for p in self._dense_params if p.grad is not None]
        if dense_grads:
            torch._foreach_mul_(dense_grads, 1.0 / max(float(weights.sum()), 1e-12))
        self.optimizer.step()
        self._step += 1
        self.dense.maybe_sync(self._step)
        out = {}
        for name, inp in inputs.items():
            grad = inp.weight.grad
            g = grad if grad is not None else torch.zeros_like(inp.weight)
            if self.mode == "geo":
                self.caches[name].local_step(slots_t[name], g, self.settings.geo_lr)
            out[name] = g
        self.result.rows += batch.num_rows
        self.result.last_row_at = time.time()
        if not self.result.first_row_at:
            self.result.first_row_at = self.result.last_row_at
        return out

    # -- offsets -----------------------------------------------------------
    def _poll_commits(self) -> None:
        """Commit the positions of every leading pass whose pushes are all applied."""
        while self._push_futures and self._push_futures[0].done():
            self._push_futures.popleft().result()  # re-raise push errors here
        ready: list[Source] = []
        while self._pending and all(self.backend.is_applied(r) for r in self._pending[0].receipts):
            ready.extend(self._pending.popleft().completes)
        self._commit_sources(ready)

    def _commit_sources(self, sources: list[Source]) -> None:
        if not sources:
            return
        positions = _offset_positions(sources)
        if self._commit is not None:
            self._commit(positions)
        self._committed.update(positions)

    def _flush_all(self, dense: bool = True) -> None:
        """Wait until every push is applied, commit, and (``dense``) merge dense params."""
        while self._push_futures:
            self._push_futures.popleft().result()
        self.backend.flush()
        ready: list[Source] = []
        while self._pending:
            ready.extend(self._pending.popleft().completes)
        self._commit_sources(ready)
        if self._started and dense:
            self.dense.sync()

    def _hold_for_cut(self, source: BatchSource) -> bool:
        """Whether a snapshot cut waits for this trainer; holds the source meanwhile.

        A held source (QueueDataset.hold) takes no new messages and finishes the
        started ones, so a clean point comes even when the stream is never idle and
        messages do not end on batch boundaries.
        """
        cut = self.participant is not None and self.participant.wants_cut()
        hold = getattr(source, "hold", None)
        if hold is not None and cut != self._holding:
            hold(cut)
            self._holding = cut
        return cut

    def _finish_drain(self, source: BatchSource) -> None:
        """Train what is still handed out (rest of started messages), push, apply, commit."""
        with self._drain_cond:
            asked = self._drains_asked
        while (p := self._assemble(source, 0.0)) is not None:
            self.start(p.items[0])
            self._prefetch(p)
            self._train_pass(p, self._install(p))
        self._flush_all()
        with self._drain_cond:  # later requests drain again: they may have missed rows
            self._drains_done = max(self._drains_done, asked)
            self._drain_cond.notify_all()


def _tensor(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """float32 tensor on ``device``; decoded batches are read-only views, so copy those."""
    return torch.from_numpy(np.require(values, np.float32, ["W"])).to(device)


def _pass_sum(
    parts: list[tuple[npt.NDArray[np.int64] | None, torch.Tensor]],
    rows: int,
    dim: int,
    device: torch.device,
) -> F32:
    """Per-batch row gradients summed at the pass's positions (one batch: as it is)."""
    if len(parts) == 1 and parts[0][0] is None:
        return parts[0][1].cpu().numpy()
    total = torch.zeros((rows, dim), dtype=torch.float32, device=device)
    for local, grad in parts:
        if local is None:
            total += grad
        else:
            total.index_add_(0, torch.from_numpy(local).to(device), grad)
    return total.cpu().numpy()


def _done(value: Any) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_result(value)
    return fut


def _offset_positions(sources: Iterable[Source]) -> dict[tuple[str, int], int]:
    """Next offset to commit per (topic, partition): max completed offset + 1."""
    out: dict[tuple[str, int], int] = {}
    for topic, partition, offset in sources:
        key = (topic, partition)
        out[key] = max(out.get(key, 0), offset + 1)
    return out


def _offset_map(sources: Iterable[Source]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (topic, partition), nxt in _offset_positions(sources).items():
        out.setdefault(topic, {})[str(partition)] = nxt
    return out
