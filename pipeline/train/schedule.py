"""The step schedule: small synchronous steps while a stream is young, large passes after.

One default must be both accurate and fast. Sparse rows learn from few examples while
a stream is young: every step counts, large batches merge many occurrences of a
feature into one Adagrad step, and rows read a pass ahead miss the latest updates.
Once the rows have seen many examples, a large batch costs little quality and the
fixed per-batch cost is amortized. So the batch size grows with the stream's age:

- stage ``s`` trains batches of ``young_rows * 2**s`` rows (capped at ``batch_rows``)
  for ``stage_batches`` batches, then the next stage starts; each stage therefore
  lasts twice as many rows as the one before and about the same wall time;
- while a stage's batches are smaller than ``sync_below_rows`` the trainer steps
  synchronously: one batch per pass, pushed and applied before the next pull, so no
  step reads stale rows;
- from there on it runs the configured mode (async passes of ``pass_batches``).

The age is the number of rows the job has trained (all trainers; see
:class:`~pipeline.train.trainer.Trainer`), so a restarted or added trainer of an
established job starts with large batches. Measurements and the chosen defaults are
in docs/trainer.md ("The step schedule").
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Stage", "StepSchedule"]


@dataclass(frozen=True)
class Stage:
    """How the trainer steps at one age of the stream."""

    number: int
    batch_rows: int
    pass_batches: int
    synchronous: bool  # one batch per pass, applied before the next pull


@dataclass(frozen=True)
class StepSchedule:
    """Batch size and synchrony as a function of the rows trained so far."""

    batch_rows: int = 1024
    pass_batches: int = 2
    young_rows: int = 32
    stage_batches: int = 256
    sync_below_rows: int = 256

    def __post_init__(self) -> None:
        if min(self.batch_rows, self.pass_batches, self.young_rows, self.stage_batches) < 1:
            raise ValueError(
                "batch_rows, pass_batches, young_rows and stage_batches must be >= 1, got "
                f"{self.batch_rows}, {self.pass_batches}, {self.young_rows}, {self.stage_batches}"
            )
        if self.sync_below_rows < 0:
            raise ValueError(f"sync_below_rows must be >= 0, got {self.sync_below_rows}")

    @classmethod
    def fixed(
        cls, batch_rows: int, pass_batches: int = 1, synchronous: bool = False
    ) -> StepSchedule:
        """Always the same step: ``batch_rows`` rows, ``pass_batches`` per pass."""
        return cls(
            batch_rows=batch_rows,
            pass_batches=pass_batches,
            young_rows=batch_rows,
            sync_below_rows=batch_rows + 1 if synchronous else 0,
        )

    @property
    def grows(self) -> bool:
        """Whether the batch size changes with age (False for a fixed schedule)."""
        return self.young_rows < self.batch_rows

    def stage(self, age_rows: int) -> Stage:
        """The stage for a stream that has trained ``age_rows`` rows."""
        number, start, rows = 0, 0, min(self.young_rows, self.batch_rows)
        while rows < self.batch_rows:
            end = start + self.stage_batches * rows
            if age_rows < end:
                break
            number, start, rows = number + 1, end, min(2 * rows, self.batch_rows)
        synchronous = rows < self.sync_below_rows
        return Stage(number, rows, 1 if synchronous else self.pass_batches, synchronous)

    def established_at(self) -> int:
        """The age (rows) from which batches have their full size."""
        start, rows = 0, min(self.young_rows, self.batch_rows)
        while rows < self.batch_rows:
            start += self.stage_batches * rows
            rows = min(2 * rows, self.batch_rows)
        return start
