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
recently used first. A pass needing more rows than the capacity is an error
(raise the capacity or shorten the pass).

The cache never decides values: rows hold exactly what the server returned (or
what geo mode's local steps made of it), so CPU and CUDA give the same results.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from pipeline.errors import PipelineError
from pipeline.ps.index import SlotMap

__all__ = ["GEO_INITIAL_ACCUMULATOR", "CacheFull", "CacheStats", "DeviceCache"]

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
        self._used = np.full(capacity, -(2**62), dtype=np.int64)
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._slots)

    def plan(self, ids: U64, pass_no: int) -> U64:
        """Which of the unique ``ids`` must be pulled for pass ``pass_no`` (absent or too old).

        Read-only, so it may run on the communication thread while the compute
        thread trains (which changes row values, never which ids are resident).
        """
        ids = np.asarray(ids, dtype=np.uint64)
        slots = self._slots.lookup(ids)
        need = slots < 0
        present = ~need
        need[present] = self._pulled[slots[present]] < pass_no - self.max_age_passes
        return ids[need]

    def install(
        self,
        ids: U64,
        weights: npt.NDArray[np.float32],
        found: npt.NDArray[np.bool_],
        pass_ids: U64,
        pass_no: int,
    ) -> None:
        """Write pulled rows; make room by evicting rows that ``pass_ids`` does not use."""
        ids = np.asarray(ids, dtype=np.uint64)
        pass_ids = np.asarray(pass_ids, dtype=np.uint64)
        self.stats.passes += 1
        self.stats.pulled += len(ids)
        pinned = self._slots.lookup(pass_ids)
        self._used[pinned[pinned >= 0]] = pass_no
        slots = self._slots.lookup(ids)
        new = slots < 0
        n_new = int(new.sum())
        room = self.capacity - len(self._slots)
        if n_new > room:
            self._evict(n_new - room, pass_no)
        if n_new:
            slots[new] = self._slots.assign(ids[new])
        if len(ids):
            index = torch.from_numpy(slots).to(self.device)
            values = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
            values = values.to(self.device)
            if self.base is not None and self.accum is not None and self.recent is not None:
                values = values + self.recent[index]
                self.base[index] = values
                # a re-pulled resident row keeps its accumulator (resetting it makes
                # every refresh restart with large steps); new rows start at 0.1 like
                # the tables' Adagrad
                if n_new:
                    fresh = torch.from_numpy(slots[new]).to(self.device)
                    self.accum[fresh] = GEO_INITIAL_ACCUMULATOR
            self.weight[index] = values
            self.found[slots] = found
            self._pulled[slots] = pass_no
            self._used[slots] = pass_no

    def _evict(self, count: int, pass_no: int) -> None:
        live = self._slots.live_slots()
        candidates = live[self._used[live] < pass_no]
        if len(candidates) < count:
            raise CacheFull(
                f"cache of table {self.table!r} holds {self.capacity} rows; this pass needs "
                f"{len(live) - len(candidates) + count}: "
                "raise the cache capacity or shorten the pass"
            )
        order = np.argsort(self._used[candidates], kind="stable")[:count]
        victims = candidates[order]
        self._slots.release(victims)
        self._pulled[victims] = -(2**62)
        self._used[victims] = -(2**62)
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
