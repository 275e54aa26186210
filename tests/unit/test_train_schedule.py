"""The step schedule: stages by age, synchrony, fixed schedules, and the trainer following it."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.codec.samplebatch import concat
from pipeline.ingest.generator import TrafficConfig, TrafficGenerator
from pipeline.train.backend import LocalBackend
from pipeline.train.defaults import default_model, default_tables
from pipeline.train.schedule import Stage, StepSchedule
from pipeline.train.settings import TrainerSettings
from pipeline.train.trainer import RowSource, Trainer

pytestmark = pytest.mark.unit


def test_stages_double_every_stage_batches_up_to_the_batch_size() -> None:
    s = StepSchedule(
        batch_rows=256, pass_batches=2, young_rows=32, stage_batches=10, sync_below_rows=128
    )
    assert s.stage(0) == Stage(0, 32, 1, True)
    assert s.stage(319) == Stage(0, 32, 1, True)
    assert s.stage(320) == Stage(1, 64, 1, True)  # 10 batches of 32 rows
    assert s.stage(320 + 640) == Stage(2, 128, 2, False)  # 128 >= sync_below_rows
    assert s.stage(320 + 640 + 1280) == Stage(3, 256, 2, False)
    assert s.established_at() == 320 + 640 + 1280
    assert s.stage(10**9) == Stage(3, 256, 2, False)
    assert s.grows


def test_fixed_schedules_never_change() -> None:
    sync = StepSchedule.fixed(32, synchronous=True)
    assert not sync.grows
    assert sync.stage(0) == sync.stage(10**8) == Stage(0, 32, 1, True)
    geo = StepSchedule.fixed(512, 4)
    assert geo.stage(10**6) == Stage(0, 512, 4, False)
    with pytest.raises(ValueError, match="must be >= 1"):
        StepSchedule(batch_rows=0)


def test_settings_pick_the_schedule_of_the_mode() -> None:
    assert TrainerSettings(mode="sync", batch_rows=32).schedule().stage(10**6) == Stage(
        0, 32, 1, True
    )
    assert not TrainerSettings(mode="geo").schedule().grows
    default = TrainerSettings().schedule()
    assert default.grows and default.stage(0).synchronous
    assert default.stage(10**7).batch_rows == TrainerSettings().batch_rows
    # young rows equal to the batch size: a fixed async schedule
    assert not TrainerSettings(batch_rows=256, young_batch_rows=256).schedule().grows


def _trainer(settings: TrainerSettings) -> tuple[Trainer, RowSource]:
    gen = TrafficGenerator(TrafficConfig(seed=3))
    rows = concat([b for b, _ in gen.samples(6000, 1000)])
    tables = {t.name: t for t in default_tables(gen.slot_config)}
    spec = default_model(gen.slot_config, hidden=(8,))
    trainer = Trainer(spec, tables, LocalBackend(list(tables.values())), settings)
    return trainer, RowSource(rows)


def test_the_trainer_grows_its_batches_with_the_rows_it_trained() -> None:
    settings = TrainerSettings(
        device="cpu", batch_rows=256, young_batch_rows=32, stage_batches=8, sync_below_rows=64
    )
    trainer, source = _trainer(settings)
    sizes: list[int] = []
    seen = [0]

    def record(t: Trainer) -> None:
        sizes.append(t.result.rows - seen[0])
        seen[0] = t.result.rows

    trainer.run(source, on_progress=record)
    trainer.close()
    assert trainer.result.rows == 6000  # every row once
    # 8 synchronous passes of one 32-row batch, then asynchronous passes of 2 batches of
    # 64, 128 and 256 rows (a stage starts up to a pass late: the next pass is read
    # ahead), the last pass partial
    assert sizes[:8] == [32] * 8
    assert sizes[:-1] == sorted(sizes[:-1])
    assert list(dict.fromkeys(sizes[:-1])) == [32, 128, 256, 512]
    assert sizes.count(128) in (4, 5) and sizes.count(256) in (4, 5)  # 8 batches a stage
    assert trainer.stage.batch_rows == 256 and not trainer.stage.synchronous


def test_an_established_job_starts_with_large_steps() -> None:
    """A trainer joining a job that trained many rows (global metrics) skips young stages."""
    settings = TrainerSettings(device="cpu", batch_rows=256, young_batch_rows=32, stage_batches=8)
    trainer, source = _trainer(settings)
    trainer.stream_age = lambda: 10**6
    trainer.run(source)
    trainer.close()
    assert trainer.stage.batch_rows == 256
    assert trainer.result.batches == int(np.ceil(6000 / 256))
    assert trainer.result.passes == int(np.ceil(6000 / 512))
