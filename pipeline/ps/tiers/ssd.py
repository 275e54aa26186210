"""SSD cold tier on RocksDB (via rocksdict): WAL on, bloom filter, sized block cache.

Layout: key = 8-byte big-endian id (so iteration order is id order), value =
``width`` little-endian float32. Two metadata keys (not 8 bytes long, so they
never collide with ids) hold the exact row count and the width; the count is
updated in the same WriteBatch as the rows, so it stays exact across crashes.

Durability: every batch goes through the WAL, so an acknowledged ``put`` or
``delete`` survives SIGKILL of the process. ``sync_writes=True`` also fsyncs the
WAL per batch (survives power loss, much slower).

Gotcha handled here: RocksDB keeps per-column-family options; reopening through
rocksdict without passing ``column_families={"default": options}`` silently
uses an 8 MB block cache. We always pass the same options for the default
family, on create and on reopen.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from rocksdict import (
    BlockBasedOptions,
    Cache,
    Checkpoint,
    DBCompressionType,
    Options,
    Rdict,
    WriteBatch,
    WriteOptions,
)

from pipeline.arrayops import unique
from pipeline.ps.tiers.base import F32, U64, ColdTier, RowChunk

__all__ = ["DEFAULT_BLOCK_CACHE_BYTES", "SsdTier"]

DEFAULT_BLOCK_CACHE_BYTES = 512 << 20
_COUNT_KEY = b"__count__"
_WIDTH_KEY = b"__width__"
_KEY_BYTES = 8
_PREPARED_MEMTABLE_BYTES = 4 << 20  # what prepare_checkpoint leaves for checkpoint to flush
_FLUSHED_MEMTABLE_BYTES = 32 << 20  # ... once the flush it asked for is done (progress)
# RocksDB's defaults, set explicitly because prepare_checkpoint reads them: a flush that
# would add the slowdown-th L0 file waits for compaction first (holding the GIL, here).
_L0_SLOWDOWN = 20
_L0_STOP = 36


def _options(block_cache_bytes: int, bloom_bits_per_key: int) -> Options:
    """RocksDB options for point lookups of small fixed-size rows (measured on this workload).

    LZ4: float rows barely compress, but rows of unadmitted features (zero weights
    and state) do, and LZ4 costs little on reads. Whole-key bloom filtering in the
    memtable makes lookups of absent ids (promotion misses, the existence check
    of ``put``) about 3x faster.
    """
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.increase_parallelism(max(2, os.cpu_count() or 2))
    opts.set_level_compaction_dynamic_level_bytes(True)
    opts.set_compression_type(DBCompressionType.lz4())
    opts.set_memtable_whole_key_filtering(True)
    opts.set_memtable_prefix_bloom_ratio(0.1)
    opts.set_level_zero_slowdown_writes_trigger(_L0_SLOWDOWN)
    opts.set_level_zero_stop_writes_trigger(_L0_STOP)
    table = BlockBasedOptions()
    table.set_block_cache(Cache(block_cache_bytes))
    table.set_bloom_filter(bloom_bits_per_key, False)  # full (not block-based) filter
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    opts.set_block_based_table_factory(table)
    return opts


class SsdTier(ColdTier):
    """A :class:`ColdTier` in a RocksDB directory; reopening the same path restores it."""

    def __init__(
        self,
        path: str | Path,
        width: int,
        *,
        block_cache_bytes: int = DEFAULT_BLOCK_CACHE_BYTES,
        bloom_bits_per_key: int = 10,
        sync_writes: bool = False,
    ) -> None:
        super().__init__(width)
        self.path = Path(path)
        self._settings = (block_cache_bytes, bloom_bits_per_key, sync_writes)
        self._row_bytes = width * 4
        self._open()

    def _open(self) -> None:
        block_cache_bytes, bloom_bits_per_key, sync_writes = self._settings
        opts = _options(block_cache_bytes, bloom_bits_per_key)
        self._db = Rdict(str(self.path), opts, column_families={"default": opts})
        write_opts = WriteOptions()
        write_opts.sync = sync_writes
        self._db.set_write_options(write_opts)
        stored_width = self._db.get(_WIDTH_KEY)
        if stored_width is None:
            self._db.put(_WIDTH_KEY, int(self.width).to_bytes(8, "little"))
        elif int.from_bytes(stored_width, "little") != self.width:
            self._db.close()
            self._closed = True
            raise ValueError(
                f"{self.path} holds rows of width {int.from_bytes(stored_width, 'little')}, "
                f"not {self.width}"
            )
        raw_count = self._db.get(_COUNT_KEY)
        self._count = 0 if raw_count is None else int.from_bytes(raw_count, "little")
        self._closed = False
        self._flush_asked = False

    @property
    def block_cache_bytes(self) -> int:
        """Block cache capacity RocksDB actually uses (guards the 8 MB reopen gotcha)."""
        return int(self._db.property_int_value("rocksdb.block-cache-capacity") or 0)

    def _keys(self, ids: U64) -> list[bytes]:
        raw = ids.astype(">u8").tobytes()
        return [raw[i : i + _KEY_BYTES] for i in range(0, len(raw), _KEY_BYTES)]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"SsdTier {self.path} is closed")

    def _multi_get(self, keys: list[bytes]) -> list[bytes | None]:
        """One RocksDB MultiGet for a batch of keys."""
        return cast("list[bytes | None]", self._db.get(cast("list[Any]", keys))) if keys else []

    def _exists(self, keys: list[bytes]) -> list[bool]:
        # Needed to keep count() exact under upserts and deletes.
        return [v is not None for v in self._multi_get(keys)]

    def _write(self, batch: WriteBatch, delta: int) -> None:
        """Commit ``batch`` together with the updated row count (one atomic WAL record)."""
        count = self._count + delta
        batch.put(_COUNT_KEY, count.to_bytes(8, "little"))
        self._db.write(batch)
        self._count = count

    def put(self, ids: U64, rows: F32) -> None:
        self._check_open()
        ids = self._check_ids(ids)
        rows = self._check_rows(ids, rows)
        if ids.shape[0] == 0:
            return
        keep = self._last_wins(ids)
        ids, rows = ids[keep], rows[keep]
        keys = self._keys(ids)
        raw = np.ascontiguousarray(rows, dtype="<f4").tobytes()
        size = self._row_bytes
        values = [raw[i : i + size] for i in range(0, len(raw), size)]
        added = len(keys) - sum(self._exists(keys))
        batch = WriteBatch(raw_mode=True)
        for key, value in zip(keys, values, strict=True):
            batch.put(key, value)
        self._write(batch, added)

    def get(self, ids: U64) -> tuple[npt.NDArray[np.bool_], F32]:
        self._check_open()
        ids = self._check_ids(ids)
        rows = np.zeros((ids.shape[0], self.width), dtype=np.float32)
        if ids.shape[0] == 0:
            return np.zeros(0, dtype=bool), rows
        values = self._multi_get(self._keys(ids))
        found = np.array([v is not None for v in values], dtype=np.bool_)
        if found.any():
            data = b"".join(v for v in values if v is not None)
            rows[found] = np.frombuffer(data, dtype="<f4").reshape(-1, self.width)
        return found, rows

    def _delete_keys(self, keys: list[bytes]) -> None:
        batch = WriteBatch(raw_mode=True)
        for key in keys:
            batch.delete(key)
        self._write(batch, -len(keys))

    def delete(self, ids: U64) -> None:
        self._check_open()
        keys = self._keys(unique(self._check_ids(ids)))
        present = [k for k, ok in zip(keys, self._exists(keys), strict=True) if ok]
        if present:
            self._delete_keys(present)

    def pop(self, ids: U64) -> tuple[npt.NDArray[np.bool_], F32]:
        # One multi-get serves both the rows and the existence check of the delete.
        found, rows = self.get(ids)
        if found.any():
            self._delete_keys(self._keys(unique(np.asarray(ids)[found])))
        return found, rows

    def count(self) -> int:
        return self._count

    def iter_chunks(self, chunk_rows: int = 65_536) -> Iterator[RowChunk]:
        self._check_open()
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        # A RocksDB iterator reads from an implicit snapshot taken at its creation,
        # so writes made while iterating (shrink) neither appear nor disturb it.
        keys: list[bytes] = []
        values: list[bytes] = []
        for key, value in cast("Iterator[tuple[bytes, bytes]]", self._db.items()):
            if len(key) != _KEY_BYTES:
                continue  # metadata
            keys.append(key)
            values.append(value)
            if len(keys) == chunk_rows:
                yield self._decode(keys, values)
                keys, values = [], []
        if keys:
            yield self._decode(keys, values)

    def _decode(self, keys: list[bytes], values: list[bytes]) -> RowChunk:
        ids = np.frombuffer(b"".join(keys), dtype=">u8").astype(np.uint64)
        rows = np.frombuffer(b"".join(values), dtype="<f4").reshape(-1, self.width)
        return ids, rows.astype(np.float32)

    def checkpoint(self, path: str | Path) -> None:
        """RocksDB Checkpoint: hard-links live SST files (same filesystem), copies the rest.

        RocksDB builds it in ``<path>.tmp`` and renames it, so ``path`` appears
        complete or not at all; open it with ``SsdTier(path, width)``.
        """
        self._check_open()
        Checkpoint(self._db).create_checkpoint(str(path))
        self._flush_asked = False

    def prepare_checkpoint(self) -> bool:
        """Flush the memtable on RocksDB's own thread, so that :meth:`checkpoint` (which
        flushes what is left while holding the GIL) stays short; True once it is.

        Measured here (1M rows of 148 B): a checkpoint took 160 ms with a full memtable
        (~50 MB) and 20 ms after a background flush plus 20k more rows; the flush call
        itself returns in 1 ms. Neither is called while a flush is running or while one
        more L0 file would reach the slowdown trigger: RocksDB then waits for compaction
        before flushing, and rocksdict holds the GIL meanwhile (a 5 s stall was measured
        right after loading 3M rows, 19 L0 files). Under such a backlog this stays False
        until compaction catches up.
        """
        self._check_open()
        busy = self._property("rocksdb.num-immutable-mem-table")
        busy += self._property("rocksdb.num-running-flushes")
        if busy or self._property("rocksdb.num-files-at-level0") + 1 >= _L0_SLOWDOWN:
            return False
        active = self._property("rocksdb.cur-size-active-mem-table")
        small = _FLUSHED_MEMTABLE_BYTES if self._flush_asked else _PREPARED_MEMTABLE_BYTES
        if active > small:
            self._db.flush(False)  # wait=False: returns at once, RocksDB flushes in background
            self._flush_asked = True
            return False
        return True

    def _property(self, name: str) -> int:
        return int(self._db.property_int_value(name) or 0)

    def restore(self, path: str | Path) -> None:
        """Reopen on a copy of checkpoint ``path``: SST files are hard-linked (RocksDB never
        modifies them, and the links keep them alive when either side deletes its name;
        copied across filesystems), the small MANIFEST/CURRENT/OPTIONS/WAL files copied."""
        self._check_open()
        source = Path(path)
        if not (source / "CURRENT").is_file():
            raise ValueError(f"{source} is not a RocksDB checkpoint (no CURRENT file)")
        self._db.close()
        self._closed = True
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        for item in source.iterdir():
            target = self.path / item.name
            if item.suffix == ".sst":
                try:
                    os.link(item, target)
                    continue
                except OSError:
                    pass  # another filesystem: copy
            shutil.copy2(item, target)
        self._open()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._db.close()
