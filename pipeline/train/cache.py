"""The device cache: a pass's sparse rows, pulled once, held on the training device.

This is the HBM level of the SSD -> memory -> HBM hierarchy. Before a pass (a
window of batches) the trainer collects the pass's unique ids per table, asks
:meth:`DeviceCache.plan` which of them are absent or too old, pulls only those
from the parameter server (on the communication thread, while the previous pass
trains) and :meth:`DeviceCache.install` writes them into one preallocated tensor
on the device. Batches then gather their rows from that tensor by cache slot.

Staleness is explicit: a row pulled in pass ``p`` serves passes up to
``p + max_age_passes``; after that it is pulled again. ``max_age_passes=0``
re-pulls every row each pass (the cache then saves the duplicate pulls within a
pass); larger values also save pulls across passes at the price of staler rows.
Capacity is fixed; when a pass needs room, rows not used by it are evicted least
recently used first, at a cost proportional to the rows evicted (not to the
capacity). A pass needing more rows than the capacity is an error (raise the
capacity or shorten the pass).

The cache never decides values: rows hold exactly what the server returned (or
what geo mode's local steps made of it), so CPU and CUDA give the same results.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from pipeline.errors import PipelineError
from pipeline.ps.index import SlotMap

__all__ = ["GEO_INITIAL_ACCUMULATOR", "CacheFull", "CacheStats", "DeviceCache", "Plan"]

GEO_INITIAL_ACCUMULATOR = 0.1

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]


class CacheFull(PipelineError):
    """One pass needs more distinct rows than the cache holds."""


@dataclass
class CacheStats:
    """Counters since start: lookups are the unique ids of each batch."""

    lookups: int = 0
    pulled: int = 0
    evicted: int = 0
    passes: int = 0

    @property
    def hit_rate(self) -> float:
        """Fraction of per-batch unique id lookups served without a pull."""
        return 1.0 - self.pulled / self.lookups if self.lookups else 0.0


@dataclass(frozen=True)
class Plan:
    """What a pass needs from the server: its ids, their cache slots and which to pull.

    Made by :meth:`DeviceCache.plan` (read-only, so it may run while the previous pass
    trains) and consumed by :meth:`DeviceCache.install`, which reuses its lookups.
    """

    pass_no: int
    ids: U64  # the pass's unique ids, sorted
    slots: I64  # cache slot of each id, -1 when not resident
    pull: npt.NDArray[np.bool_]  # which ids to pull (absent or too old)

    @property
    def need(self) -> U64:
        """The ids to pull."""
        return self.ids[self.pull]


class _Recency:
    """Least-recently-used order of cache slots, by pass, at a cost that follows evictions.

    Every pass appends the slots it uses, tagged with the pass number. Eviction walks
    the oldest entries and takes the slots whose last use is still that pass (a slot
    used again later sits in a later entry too). Entries grow by the pass sizes, so
    once they hold more than twice the capacity they are rebuilt from the live slots
    (one sort, amortized over at least a capacity's worth of appends).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = np.full(capacity, -(2**62), dtype=np.int64)  # last pass using each slot
        self._entries: deque[tuple[int, I64]] = deque()
        self._length = 0

    def touch(self, slots: I64, pass_no: int) -> None:
        self.used[slots] = pass_no
        if self._entries and self._entries[-1][0] == pass_no:  # one entry per pass
            _, earlier = self._entries.pop()
            self._length -= len(earlier)
            slots = np.concatenate((earlier, slots))
        self._entries.append((pass_no, slots))
        self._length += len(slots)

    def forget(self, slots: I64) -> None:
        self.used[slots] = -(2**62)

    def oldest(self, count: int, pass_no: int, live: npt.NDArray[np.bool_]) -> I64:
        """Up to ``count`` live slots not used since before ``pass_no``, oldest first.

        Within one pass, lower slots go first. Fewer than ``count`` come back when the
        rest are all used by pass ``pass_no`` (the caller reports that).
        """
        taken: list[I64] = []
        wanted = count
        while wanted > 0 and self._entries and self._entries[0][0] < pass_no:
            entry_pass, slots = self._entries.popleft()
            self._length -= len(slots)
            valid = np.unique(slots[(self.used[slots] == entry_pass) & live[slots]])
            taken.append(valid[:wanted])
            if len(valid) > wanted:
                rest = valid[wanted:]
                self._entries.appendleft((entry_pass, rest))
                self._length += len(rest)
            wanted -= len(taken[-1])
        return np.concatenate(taken) if taken else np.zeros(0, np.int64)

    def compact(self, live: npt.NDArray[np.bool_]) -> None:
        """Rebuild the entries from the ``live`` slots once they hold over twice the capacity."""
        if self._length <= 2 * self.capacity:
            return
        slots = np.flatnonzero(live)
        order = np.lexsort((slots, self.used[slots]))
        slots = slots[order]
        passes = self.used[slots]
        cuts = np.flatnonzero(np.diff(passes)) + 1
        self._entries = deque(
            (int(passes[part[0]]), part) for part in np.split(slots, cuts) if len(part)
        )
        self._length = len(slots)


class DeviceCache:
    """Rows of one sparse table on ``device``, indexed by a slot per id."""

    def __init__(
        self,
        table: str,
        dim: int,
        capacity: int,
        device: torch.device | str = "cpu",
        *,
        max_age_passes: int = 0,
        with_state: bool = False,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1, got {capacity}")
        if max_age_passes < 0:
            raise ValueError(f"max_age_passes must be >= 0, got {max_age_passes}")
        self.table = table
        self.dim = dim
        self.capacity = capacity
        self.device = torch.device(device)
        self.max_age_passes = max_age_passes
        self.weight = torch.zeros((capacity, dim), dtype=torch.float32, device=self.device)
        # geo mode: the value last synchronized with the PS and a local Adagrad accumulator
        self.base = torch.zeros_like(self.weight) if with_state else None
        self.accum = torch.zeros_like(self.weight) if with_state else None
        # geo mode: deltas pushed at the end of the last pass, which a row pulled during
        # that pass cannot include yet; re-added when such a row is installed
        self.recent = torch.zeros_like(self.weight) if with_state else None
        self._recent_slots = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.found = np.zeros(capacity, dtype=bool)  # admitted on the server when pulled
        self._slots = SlotMap(capacity)
        self._pulled = np.full(capacity, -(2**62), dtype=np.int64)
        self._recency = _Recency(capacity)
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._slots)

    def plan(self, ids: U64, pass_no: int) -> Plan:
        """Which of the unique ``ids`` must be pulled for pass ``pass_no`` (absent or too old).

        Read-only, so it may run on the communication thread while the compute
        thread trains (which changes row values, never which ids are resident).
        """
        ids = np.asarray(ids, dtype=np.uint64)
        slots = self._slots.lookup(ids)
        pull = slots < 0
        present = ~pull
        pull[present] = self._pulled[slots[present]] < pass_no - self.max_age_passes
        return Plan(pass_no, ids, slots, pull)

    def install(
        self, plan: Plan, weights: npt.NDArray[np.float32], found: npt.NDArray[np.bool_]
    ) -> I64:
        """Write the pulled rows of ``plan``; returns the cache slot of every id of the pass.

        Room for new rows comes from evicting rows the pass does not use, least
        recently used first. The plan's lookups stay valid until its install: only
        installs change which ids are resident, and they run one pass at a time.
        """
        pass_no = plan.pass_no
        self.stats.passes += 1
        slots = plan.slots.copy()
        new = slots < 0
        n_new = int(new.sum())
        self._recency.touch(slots[~new], pass_no)  # pinned: never evicted by this pass
        room = self.capacity - len(self._slots)
        if n_new > room:
            self._evict(n_new - room, pass_no)
        if n_new:
            fresh = self._slots.assign(plan.ids[new])
            slots[new] = fresh
            self._recency.touch(fresh, pass_no)
        pulled = slots[plan.pull]
        self.stats.pulled += len(pulled)
        if len(pulled):
            index = torch.from_numpy(pulled).to(self.device)
            values = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
            values = values.to(self.device)
            if self.base is not None and self.accum is not None and self.recent is not None:
                values = values + self.recent[index]
                self.base[index] = values
                # a re-pulled resident row keeps its accumulator (resetting it makes
                # every refresh restart with large steps); new rows start at 0.1 like
                # the tables' Adagrad
                if n_new:
                    fresh_t = torch.from_numpy(slots[new]).to(self.device)
                    self.accum[fresh_t] = GEO_INITIAL_ACCUMULATOR
            self.weight[index] = values
            self.found[pulled] = found
            self._pulled[pulled] = pass_no
        self._recency.compact(self._slots.live[: self.capacity])
        return slots

    def _evict(self, count: int, pass_no: int) -> None:
        live = self._slots.live[: self.capacity]
        victims = self._recency.oldest(count, pass_no, live)
        if len(victims) < count:
            pinned = int(np.count_nonzero(live & (self._recency.used == pass_no)))
            raise CacheFull(
                f"cache of table {self.table!r} holds {self.capacity} rows; this pass needs "
                f"{pinned + count}: raise the cache capacity or shorten the pass"
            )
        self._slots.release(victims)
        self._pulled[victims] = -(2**62)
        self._recency.forget(victims)
        self.found[victims] = False
        self.stats.evicted += len(victims)

    def slots(self, ids: U64) -> I64:
        """Cache slots of resident ``ids`` (raises when one is missing: plan/install first)."""
        slots = self._slots.lookup(np.asarray(ids, dtype=np.uint64))
        if len(slots) and slots.min() < 0:
            raise KeyError(f"{int((slots < 0).sum())} ids are not in the {self.table!r} cache")
        return slots

    def ids_of(self, slots: I64) -> U64:
        """The ids held in ``slots``."""
        return self._slots.ids[slots]

    # -- geo mode ----------------------------------------------------------
    def local_step(self, slots: torch.Tensor, grads: torch.Tensor, lr: float) -> None:
        """Geo mode: one local Adagrad step on admitted rows (unadmitted rows stay zero)."""
        assert self.accum is not None, "cache built without with_state"
        mask = torch.from_numpy(self.found[slots.cpu().numpy()]).to(self.device)
        if not bool(mask.any()):
            return
        slots, grads = slots[mask], grads[mask]
        acc = self.accum[slots] + grads * grads
        self.accum[slots] = acc
        self.weight[slots] -= lr * grads / (acc.sqrt() + 1e-6)

    def take_deltas(self, slots: I64) -> npt.NDArray[np.float32]:
        """Geo mode: ``weight - base`` of ``slots`` (zero for unadmitted rows); base := weight."""
        assert self.base is not None, "cache built without with_state"
        assert self.recent is not None
        index = torch.from_numpy(slots).to(self.device)
        delta = self.weight[index] - self.base[index]
        self.base[index] = self.weight[index]
        self.recent[self._recent_slots] = 0.0
        self.recent[index] = delta
        self._recent_slots = index
        return delta.cpu().numpy()
