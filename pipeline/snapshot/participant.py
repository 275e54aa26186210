"""Trainer side of a snapshot: join the cut at a clean point of the trainer's own stream.

A trainer that takes part (``Trainer.participant``) heartbeats in its job's live
set, so the coordinator lists it in a snapshot request instead of placing barriers
itself. Between passes, when a request lists it, the trainer joins once it holds
no half-trained message (``source.unfinished()`` empty and no pass read ahead):
it flushes (every push applied, offsets committed, dense parameters merged),
places a ``snap:<id>`` barrier in every shard of every table carrying its
committed offsets, stores its dense parameters and optimizer state, registers,
and then waits until the coordinator closes the request (the snapshot saved or
aborted). Waiting keeps every trainer's later pushes out of the cut, so the
snapshot's offsets are exact: the saved state is the effect of exactly the
messages before them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.model.modules import dense_state, load_dense_state
from pipeline.ps.dense import pack_tensors
from pipeline.snapshot.protocol import (
    REQUEST_TTL_MS,
    TrainerRegistration,
    barrier_name,
    live_key,
    open_key,
    request_key,
    trainer_state_key,
    trainers_key,
)

if TYPE_CHECKING:
    from pipeline.train.trainer import Trainer

__all__ = ["SnapshotParticipant", "load_trainer_state", "trainer_state"]

log = logging.getLogger(__name__)

PARAM = "param."
OPT = "opt."


class SnapshotParticipant:
    """Lets one trainer of ``job`` take part in the job's snapshots."""

    def __init__(
        self,
        client: Any,
        job: str,
        trainer_id: str,
        *,
        heartbeat_ttl_ms: int = 15_000,
        heartbeat_every_s: float = 1.0,
        check_every_s: float = 0.05,
        hold_timeout_s: float = 300.0,
        clock_ms: Any = None,
    ) -> None:
        if heartbeat_ttl_ms <= 0 or hold_timeout_s <= 0:
            raise ValueError("heartbeat_ttl_ms and hold_timeout_s must be > 0")
        self.redis = client
        self.job = job
        self.trainer_id = trainer_id
        self.heartbeat_ttl_ms = heartbeat_ttl_ms
        self.heartbeat_every_s = heartbeat_every_s
        self.check_every_s = check_every_s
        self.hold_timeout_s = hold_timeout_s
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._last_beat = -1e18
        self._last_check = -1e18
        self._joined: set[str] = set()
        self._wanted: str | None = None
        self.joined: list[str] = []  # snapshot ids this trainer took part in, in order

    # -- liveness ------------------------------------------------------------
    def heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_beat < self.heartbeat_every_s:
            return
        self._last_beat = now
        expiry = self._clock_ms() + self.heartbeat_ttl_ms
        self.redis.zadd(live_key(self.job), {self.trainer_id: expiry})

    def leave(self) -> None:
        """Stop being counted as live (a trainer that exits normally)."""
        self.redis.zrem(live_key(self.job), self.trainer_id)

    # -- the request ---------------------------------------------------------
    def wants_cut(self) -> bool:
        """Whether an open snapshot lists this trainer and it has not joined yet.

        The trainer then stops reading passes ahead, so it reaches a clean point.
        """
        now = time.monotonic()
        if now - self._last_check >= self.check_every_s:
            self._last_check = now
            self._wanted = self._open_request()
        return self._wanted is not None

    def _open_request(self) -> str | None:
        raw = self.redis.get(open_key(self.job))
        if raw is None:
            return None
        snapshot_id = raw.decode()
        if snapshot_id in self._joined:
            return None
        listed = self.redis.hget(request_key(snapshot_id), b"trainers")
        if listed is None or self.trainer_id not in json.loads(listed):
            return None
        return snapshot_id

    def poll(self, trainer: Trainer, source: Any, *, ahead: bool = False) -> str | None:
        """Called between passes: heartbeat; join an open snapshot when at a clean point.

        ``ahead``: the trainer holds a pass it read but has not trained (it cannot
        join then). Returns the id of the snapshot joined, if any.
        """
        self.heartbeat()
        if not self.wants_cut() or ahead:
            return None
        unfinished = getattr(source, "unfinished", None)
        if unfinished is not None and unfinished():
            return None  # a message is half trained: its offset cannot be committed yet
        assert self._wanted is not None
        return self.join(trainer, self._wanted)

    def join(self, trainer: Trainer, snapshot_id: str) -> str:
        """Flush, place barriers, store state, register, hold until the request closes."""
        barrier = getattr(trainer.backend, "barrier", None)
        if barrier is None:
            raise PipelineError("snapshot participation needs a PS backend with barriers")
        t0 = time.perf_counter()
        trainer.flush()
        offsets: dict[str, dict[str, int]] = {}
        for (topic, partition), nxt in sorted(trainer.committed.items()):
            offsets.setdefault(topic, {})[str(partition)] = nxt
        for table in trainer.caches:
            barrier(table, barrier_name(snapshot_id), offsets=offsets)
        reg = TrainerRegistration(
            self.trainer_id,
            offsets,
            trainer.dense.name,
            trainer.dense.version,
            trainer.result.rows,
        )
        pipe = self.redis.pipeline(transaction=False)
        skey, tkey = trainer_state_key(snapshot_id, self.trainer_id), trainers_key(snapshot_id)
        pipe.set(skey, pack_tensors(trainer_state(trainer)), px=REQUEST_TTL_MS)
        pipe.hset(tkey, self.trainer_id, reg.to_json())
        pipe.pexpire(tkey, REQUEST_TTL_MS)
        pipe.execute()
        self._joined.add(snapshot_id)
        self._wanted = None
        self.joined.append(snapshot_id)
        self._hold(snapshot_id)
        log.info(
            "%s joined snapshot %s at %s (paused %.2f s)",
            self.trainer_id,
            snapshot_id,
            offsets,
            time.perf_counter() - t0,
        )
        return snapshot_id

    def _hold(self, snapshot_id: str) -> None:
        """Push nothing until the coordinator closes the request (saved or aborted)."""
        deadline = time.monotonic() + self.hold_timeout_s
        delay = 0.002
        while self.redis.exists(request_key(snapshot_id)):
            if time.monotonic() > deadline:
                log.error(
                    "snapshot %s still open after %.0f s; %s goes on training",
                    snapshot_id,
                    self.hold_timeout_s,
                    self.trainer_id,
                )
                return
            self.heartbeat()
            time.sleep(delay)
            delay = min(2 * delay, 0.05)


def trainer_state(trainer: Trainer) -> dict[str, np.ndarray]:
    """The trainer's dense parameters and dense optimizer state as named float32 arrays."""
    out = {PARAM + k: v for k, v in dense_state(trainer.model).items()}
    for i, opt in enumerate(_parts(trainer.optimizer)):
        for index, state in opt.state_dict()["state"].items():
            for key, value in state.items():
                arr = value.detach().cpu().numpy() if torch.is_tensor(value) else np.array(value)
                out[f"{OPT}{i}.{index}.{key}"] = np.asarray(arr, np.float32)
    return out


def load_trainer_state(trainer: Trainer, tensors: Mapping[str, np.ndarray]) -> None:
    """Inverse of :func:`trainer_state`: parameters and optimizer state back into ``trainer``.

    ``Optimizer.load_state_dict`` casts each state tensor to its parameter's dtype and
    device (``step`` stays a float32 scalar), as a checkpoint load does.
    """
    params = {k[len(PARAM) :]: v for k, v in tensors.items() if k.startswith(PARAM)}
    load_dense_state(trainer.model, params)
    for i, opt in enumerate(_parts(trainer.optimizer)):
        current = opt.state_dict()
        state: dict[int, dict[str, Any]] = {}
        prefix = f"{OPT}{i}."
        for name, value in tensors.items():
            if name.startswith(prefix):
                index, key = name[len(prefix) :].split(".", 1)
                state.setdefault(int(index), {})[key] = torch.from_numpy(np.array(value))
        current["state"] = state
        opt.load_state_dict(current)


def _parts(optimizer: Any) -> list[torch.optim.Optimizer]:
    return list(getattr(optimizer, "parts", [optimizer]))
