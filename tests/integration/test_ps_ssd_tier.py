"""SsdTier (embedded RocksDB): the shared tier contract plus SSD-only guarantees.

No external service is needed; it is an integration test because it does real
disk I/O and spawns a process that is SIGKILLed.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.ps.spec import TableSpec
from pipeline.ps.table import ShardTable
from pipeline.ps.tiers import ColdTier, SsdTier
from tests.procgroups import ProcessGroups

pytestmark = pytest.mark.integration


def _load_contract() -> type:
    """Import the shared suite from the unit tests by path (tests/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "unit" / "test_ps_tiers.py"
    spec = importlib.util.spec_from_file_location("ps_tier_contract", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TierContract  # type: ignore[no-any-return]


TierContract = _load_contract()
WIDTH = 5


class TestSsdTierContract(TierContract):  # type: ignore[misc, valid-type]
    @pytest.fixture
    def tier(self, tmp_path: Path) -> Iterator[ColdTier]:
        with SsdTier(tmp_path / "db", WIDTH, block_cache_bytes=16 << 20) as t:
            yield t

    def reopen(self, path: Path) -> ColdTier:
        return SsdTier(path, WIDTH, block_cache_bytes=16 << 20)


def test_reopen_keeps_rows_count_and_block_cache(tmp_path: Path) -> None:
    ids = np.arange(500, dtype=np.uint64)
    with SsdTier(tmp_path / "db", WIDTH) as tier:
        assert tier.block_cache_bytes == 512 << 20
        tier.put(ids, np.ones((500, WIDTH), np.float32))
        tier.delete(ids[:100])
    with SsdTier(tmp_path / "db", WIDTH) as tier:
        # Without passing the column-family options again, rocksdict would reopen with 8 MB.
        assert tier.block_cache_bytes == 512 << 20
        assert tier.count() == 400
        assert tier.get(ids[100:])[0].all()


def test_reopen_with_other_width_fails(tmp_path: Path) -> None:
    SsdTier(tmp_path / "db", WIDTH).close()
    with pytest.raises(ValueError, match="width"):
        SsdTier(tmp_path / "db", WIDTH + 1)


_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from pipeline.ps.tiers import SsdTier
    tier = SsdTier(sys.argv[1], 4, block_cache_bytes=8 << 20)
    batch = 0
    while True:
        ids = np.arange(batch * 1000, (batch + 1) * 1000, dtype=np.uint64)
        tier.put(ids, np.full((1000, 4), batch, np.float32))
        print(batch, flush=True)  # acknowledged only after put() returned
        batch += 1
    """
)


def test_acknowledged_writes_survive_sigkill(tmp_path: Path, processes: ProcessGroups) -> None:
    db = tmp_path / "db"
    proc = processes.start(
        [sys.executable, "-c", _WRITER, str(db)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    acked = -1
    for line in proc.stdout:
        acked = int(line)
        if acked >= 30:
            break
    os.kill(proc.pid, signal.SIGKILL)  # no close(), no flush: only the WAL can save us
    proc.wait()
    with SsdTier(db, 4) as tier:
        ids = np.arange((acked + 1) * 1000, dtype=np.uint64)
        found, rows = tier.get(ids)
        assert found.all()
        np.testing.assert_array_equal(rows[:, 0], (ids // 1000).astype(np.float32))
        assert tier.count() >= (acked + 1) * 1000  # plus batches written after the last ack


def test_tiered_table_on_ssd_equals_all_in_memory(tmp_path: Path) -> None:
    spec = TableSpec.from_dict(
        {
            "name": "deep",
            "dim": 8,
            "optimizer": {"kind": "adam"},
            "accessor": {"admit_threshold": 1.0},
        }
    )
    memory = ShardTable(spec)
    with SsdTier(tmp_path / "db", memory.cold_width, block_cache_bytes=16 << 20) as cold:
        tiered = ShardTable(spec, cold, hot_budget_rows=200)
        rng = np.random.default_rng(5)
        for step in range(30):
            ids = (rng.zipf(1.3, 512) % 3000).astype(np.uint64)
            grads = rng.normal(size=(512, 8)).astype(np.float32)
            clicks = (rng.random(512) < 0.1).astype(np.float32)
            a = memory.apply_push(ids, grads, clicks=clicks, now=1000 + step)
            b = tiered.apply_push(ids, grads, clicks=clicks, now=1000 + step)
            np.testing.assert_array_equal(a.changed_ids, b.changed_ids)
            np.testing.assert_array_equal(a.changed_weights, b.changed_weights)
            assert tiered.hot_rows <= 200
        assert cold.count() > 0 and len(tiered) == len(memory)
        probe = np.arange(3000, dtype=np.uint64)
        for got, want in zip(tiered.lookup(probe), memory.lookup(probe), strict=True):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(tiered.shrink(now=5000), memory.shrink(now=5000))
        assert len(tiered) == len(memory)


def test_prepare_checkpoint_flushes_the_memtable_in_the_background(tmp_path: Path) -> None:
    rows = 300_000  # ~10 MB of memtable: more than prepare_checkpoint leaves behind
    with SsdTier(tmp_path / "db", WIDTH) as tier:
        ids = np.arange(rows, dtype=np.uint64)
        tier.put(ids, np.ones((rows, WIDTH), np.float32))
        assert not tier.prepare_checkpoint()  # flush started, not finished
        deadline = time.monotonic() + 60  # a guard against hanging, not a speed check
        while not tier.prepare_checkpoint():
            assert time.monotonic() < deadline, "background flush never finished"
            time.sleep(0.01)
        assert tier._property("rocksdb.cur-size-active-mem-table") <= 4 << 20
        tier.checkpoint(tmp_path / "ckpt")
    with SsdTier(tmp_path / "ckpt", WIDTH) as copy:
        assert copy.count() == rows
        assert copy.get(ids[-5:])[0].all()
