"""Commits and drains of the training loop, in process (LocalBackend, no Kafka).

- An idle trainer commits the passes whose pushes were applied meanwhile, so the
  group's lag reaches 0 when the data ends (not only at the next batch or at stop).
- A drain requested by a revocation returns once the loop drained, and also when the
  loop has already ended (a stop raced the revocation), instead of waiting its
  timeout for a loop that will never drain again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import pytest

from pipeline.ingest.generator import TrafficConfig, TrafficGenerator
from pipeline.train.backend import LocalBackend
from pipeline.train.batching import TrainBatch
from pipeline.train.defaults import default_model, default_tables
from pipeline.train.settings import TrainerSettings
from pipeline.train.trainer import Trainer

pytestmark = pytest.mark.unit

MESSAGES = 9


class Stream:
    """Messages of 100 rows on partition 0 of topic ``s``, then an idle, open stream."""

    def __init__(self) -> None:
        gen = TrafficGenerator(TrafficConfig(seed=3))
        self.batches = [
            TrainBatch(b, (("s", 0, i),), 0) for i, (b, _) in enumerate(gen.samples(900, 100))
        ]
        self.slots = gen.slot_config

    def get(self, timeout: float) -> TrainBatch | None:
        if self.batches:
            return self.batches.pop(0)
        time.sleep(min(timeout, 0.01))
        return None


def _trainer(stream: Stream, commits: list[dict[tuple[str, int], int]]) -> Trainer:
    tables = {t.name: t for t in default_tables(stream.slots)}
    spec = default_model(stream.slots, hidden=(8,))
    # asynchronous from the first row: a pass's push completes after the next pass began
    settings = TrainerSettings(
        device="cpu", batch_rows=100, young_batch_rows=100, sync_below_rows=0
    )

    def commit(positions: Mapping[tuple[str, int], int]) -> None:
        commits.append(dict(positions))

    return Trainer(spec, tables, LocalBackend(list(tables.values())), settings, commit=commit)


def _running(trainer: Trainer, stream: Stream) -> threading.Thread:
    thread = threading.Thread(target=trainer.run, args=(stream,), daemon=True)
    thread.start()
    return thread


def _wait(what: str, done: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_an_idle_trainer_commits_every_applied_pass() -> None:
    stream, commits = Stream(), list[dict[tuple[str, int], int]]()
    trainer = _trainer(stream, commits)
    thread = _running(trainer, stream)
    try:
        _wait("every message committed while idle", lambda: trainer.committed == {("s", 0): 9})
        assert commits[-1] == {("s", 0): MESSAGES}
        assert thread.is_alive()  # committed while running, not by the stop
    finally:
        trainer.stop()
        thread.join(30)
        trainer.close()
    assert trainer.result.rows == 900


def test_a_drain_requested_while_idle_is_done_by_the_loop() -> None:
    stream, commits = Stream(), list[dict[tuple[str, int], int]]()
    trainer = _trainer(stream, commits)
    thread = _running(trainer, stream)
    try:
        _wait("the data trained", lambda: trainer.result.rows == 900)
        drain = threading.Thread(target=trainer.request_drain, daemon=True)
        drain.start()
        drain.join(30)
        assert not drain.is_alive(), "request_drain did not return"
        assert trainer.committed == {("s", 0): MESSAGES}  # the drain committed everything
    finally:
        trainer.stop()
        thread.join(30)
        trainer.close()


def test_a_drain_requested_after_the_loop_ended_returns() -> None:
    """The hang of the revoke-then-SIGTERM race: the loop stopped, then a revocation asked
    it to drain. Its last flush committed everything, so there is nothing to wait for."""
    stream, commits = Stream(), list[dict[tuple[str, int], int]]()
    trainer = _trainer(stream, commits)
    thread = _running(trainer, stream)
    _wait("the data trained", lambda: trainer.result.rows == 900)
    trainer.stop()
    thread.join(30)
    assert not thread.is_alive()
    drain = threading.Thread(target=trainer.request_drain, daemon=True)
    drain.start()
    drain.join(30)  # the default timeout is 120 s: a hang shows as a live thread
    assert not drain.is_alive(), "request_drain waited for a loop that had ended"
    assert trainer.committed == {("s", 0): MESSAGES}
    trainer.close()
