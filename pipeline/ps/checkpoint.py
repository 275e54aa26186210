"""Incremental checkpoints of one shard table: a base plus deltas of changed rows.

A shard server must survive SIGKILL without losing an acknowledged push, and its
checkpoints must not stall the apply loop for a time that grows with the table
(a full export of 10M rows stalls it about 4.6 s). So a checkpoint writes only
what changed since the previous one, and a full copy (a *base*) is written in
slices between apply rounds.

Layout of a table's checkpoint directory (``<data_dir>/<table>/shard-<i>-of-<S>``)::

    CURRENT                   JSON, replaced atomically: the chain a restart loads
    ckpt-<cut>-base/rows/     export directory (pipeline.ps.export): the hot tier's rows
    ckpt-<cut>-base/cold/     checkpoint of the cold tier (RocksDB: hard links)
    ckpt-<cut>-delta/         export directory: rows changed up to cut <cut>, every
                              column, + deleted.npy; meta.json info holds cut, stream id

How it works (``cut`` = one checkpoint point; all reads happen on the apply thread
between rounds, all file writing on two background threads):

- **Delta**: at cut *n* the table hands over the rows changed since cut *n-1*
  (``ShardTable.cut_changes``: O(changed) copies). A thread writes them, fsyncs,
  and extends CURRENT with the delta and the stream id it covers; only then is
  the stream trimmed up to that id. A cut is made every ``interval_s`` and as soon
  as ``max_delta_rows`` rows changed, which bounds both the copy (the stall) and
  the delta size.
- **Base (compaction)**: started at cut *t0* when the deltas since the last base
  hold more than ``compact_fraction`` of the table, or when a delta cannot
  describe the change (tracking lost: shrink decayed the cold tier, a restore).
  The hot tier is read in slices of ``base_slice_rows`` (at most
  ``base_slice_budget_s`` per round) and streamed to a writer thread; then the
  cold tier is checkpointed (RocksDB hard links, after a background memtable
  flush). The base is *fuzzy*: a row changed during the scan may be read in any
  version, but every row changed after *t0* is in a delta cut after *t0*, so
  base + every delta after *t0* gives the exact state at the last delta, once one
  delta was cut after the scan ended. Then CURRENT switches to the new chain and
  the old one is deleted. Deltas cut during the scan also extend the old chain.
- **Restart**: cold tier from the base's copy, hot rows, then each delta in order
  (upserts, deletions): the same rows, bit for bit, as at the last delta's cut;
  the server replays the stream after its id. Anything CURRENT does not name is
  a leftover of a crash and is deleted.

The cold tier enters the base as a store-level checkpoint, never row by row:
RocksDB links its immutable SST files, so a base costs the hot rows plus a
memtable flush, whatever the cold tier holds. Deltas are logical (rows by id,
whatever their tier), because a row's tier is placement, not state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import PipelineError
from pipeline.ps.dirty import Changes
from pipeline.ps.export import ExportError, RowBatch, import_table, read_deleted, write_rows
from pipeline.ps.table import ShardTable

__all__ = ["CURRENT", "CheckpointError", "CheckpointOptions", "CheckpointStats", "Checkpoints"]

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
FORMAT = "pipeline.ps.checkpoint"
VERSION = 1
_PREFIX = "ckpt-"
_NAME = re.compile(r"ckpt-(\d{10})-(base|delta)")
_END = None  # end of the base's row slices
_WAKE = object()  # wakes a writer waiting for a slice (see _Base.cancelled)
_T = TypeVar("_T")


class CheckpointError(PipelineError):
    """A checkpoint chain on disk is incomplete, corrupt or does not fit the table."""


@dataclass(frozen=True)
class CheckpointOptions:
    """When to cut deltas and write bases (set from ServerOptions)."""

    interval_s: float = 30.0  # a delta at least this often while anything changes
    max_delta_rows: int = 65_536  # a delta as soon as this many rows changed (bounds the stall)
    compact_fraction: float = 0.5  # a new base once deltas hold this fraction of the table
    base_slice_rows: int = 65_536  # hot slots read per slice of a base
    base_slice_budget_s: float = 0.02  # most time per round spent reading base slices
    base_queue_slices: int = 4  # slices in flight to the writer thread (memory bound)
    cold_wait_s: float = 60.0  # then the cold tier is checkpointed even if not prepared

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.max_delta_rows < 1 or self.base_slice_rows < 1:
            raise ValueError("interval_s, max_delta_rows and base_slice_rows must be positive")
        if self.compact_fraction <= 0.0:
            raise ValueError(f"compact_fraction must be > 0, got {self.compact_fraction}")

    @property
    def tracking_limit(self) -> int:
        """Pending rows past which tracking gives up (a base is then cheaper)."""
        return 4 * self.max_delta_rows


@dataclass
class CheckpointStats:
    """What was written. Bytes are sizes of the files written; files hard-linked from the
    live cold tier (RocksDB SST files) are not counted: nothing was written for them."""

    cuts: int = 0
    deltas: int = 0
    delta_bytes: int = 0
    delta_rows: int = 0
    bases: int = 0
    base_bytes: int = 0
    commits: int = 0
    failures: int = 0


@dataclass(frozen=True)
class _Piece:
    name: str
    cut: int
    rows: int
    stream_id: str = ""
    meta_sha256: str = ""
    cold_rows: int | None = None  # bases: rows in the cold-tier checkpoint (None: no cold tier)

    def to_json(self, shas: dict[str, str]) -> dict[str, Any]:
        out = {
            "name": self.name,
            "cut": self.cut,
            "rows": self.rows,
            "meta_sha256": self.meta_sha256 or shas[self.name],
        }
        if self.stream_id:
            out["stream_id"] = self.stream_id
        if self.cold_rows is not None:
            out["cold_rows"] = self.cold_rows
        return out

    @staticmethod
    def from_json(raw: dict[str, Any]) -> _Piece:
        return _Piece(
            str(raw["name"]),
            int(raw["cut"]),
            int(raw["rows"]),
            str(raw.get("stream_id", "")),
            str(raw["meta_sha256"]),
            None if raw.get("cold_rows") is None else int(raw["cold_rows"]),
        )


@dataclass(frozen=True)
class _Chain:
    """A base and the deltas cut after it, consecutive: the state at cut ``cut``."""

    base: _Piece
    deltas: tuple[_Piece, ...]
    cut: int
    stream_id: str

    @property
    def delta_rows(self) -> int:
        return sum(d.rows for d in self.deltas)

    def names(self) -> set[str]:
        return {self.base.name, *(d.name for d in self.deltas)}

    def extended(self, delta: _Piece) -> _Chain:
        return replace(self, deltas=(*self.deltas, delta), cut=delta.cut, stream_id=delta.stream_id)

    def to_json(self, shas: dict[str, str]) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "cut": self.cut,
            "stream_id": self.stream_id,
            "base": self.base.to_json(shas),
            "deltas": [d.to_json(shas) for d in self.deltas],
        }

    @staticmethod
    def from_json(raw: dict[str, Any]) -> _Chain:
        if raw.get("format") != FORMAT or raw.get("version") != VERSION:
            raise CheckpointError(f"not a {FORMAT} v{VERSION} CURRENT file")
        base = _Piece.from_json(raw["base"])
        deltas = tuple(_Piece.from_json(d) for d in raw["deltas"])
        cuts = [base.cut, *(d.cut for d in deltas)]
        if cuts != list(range(base.cut, base.cut + len(cuts))) or cuts[-1] != raw["cut"]:
            raise CheckpointError(f"CURRENT: cuts {cuts} are not consecutive up to {raw['cut']}")
        return _Chain(base, deltas, int(raw["cut"]), str(raw["stream_id"]))


@dataclass
class _Base:
    """A base being written: hot slices go to the writer thread, then the cold tier."""

    cut: int
    path: Path
    end: int  # hot slots to scan: [0, end)
    slices: queue.Queue[Any]
    cancelled: threading.Event
    future: Future[tuple[str, int, int]]
    pos: int = 0  # next hot slot to read
    end_sent: bool = False
    cold_rows: int | None = None
    cold_since: float | None = None  # when the hot scan ended and the wait for the cold tier began
    scanned_at: int | None = None  # the cut count when the scan (hot + cold) ended
    deltas: list[_Piece] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def hot_scanned(self) -> bool:
        return self.pos >= self.end

    def put(self, item: Any, block: bool) -> bool:
        """Hand ``item`` to the writer; False when the queue is full (not blocking) or the
        writer stopped (it failed: never wait for it)."""
        while not self.future.done():
            try:
                self.slices.put(item, timeout=0.1 if block else None, block=block)
                return True
            except queue.Full:
                if not block:
                    return False
        return False


class _Skipped(Exception):
    """A job after a failed one: its commit would name a piece that was never written."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dir_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` that are not hard links (st_nlink == 1)."""
    total = 0
    for p in path.rglob("*"):
        st = p.stat()
        if p.is_file() and st.st_nlink == 1:
            total += st.st_size
    return total


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _slices(q: queue.Queue[Any], cancelled: threading.Event) -> Iterator[RowBatch]:
    while True:
        item = q.get()
        if cancelled.is_set():
            raise _Skipped("base abandoned")
        if item is _END:
            return
        yield item


def _in_thread(fn: Callable[..., _T], *args: Any) -> Future[_T]:
    """Run ``fn`` in a daemon thread. A base writer waits for slices: as a daemon it never
    holds the interpreter at exit (a pool worker would); what it leaves is cleaned up at
    the next restore."""
    future: Future[_T] = Future()

    def target() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=target, name="ckpt-base", daemon=True).start()
    return future


def _cut_of(name: str) -> int:
    match = _NAME.fullmatch(name)
    return int(match.group(1)) if match else 0


class Checkpoints:
    """The checkpoint chain of one table in ``directory``; driven by the apply thread.

    Call :meth:`restore` once, then :meth:`step` every apply round (it cuts,
    advances a base, and notices finished writes), :meth:`cut` when
    ``table.changed_rows`` reaches ``options.max_delta_rows`` inside a round, and
    trim the stream up to :attr:`durable_stream_id`. :meth:`sync` checkpoints and
    waits (shutdown); :meth:`close` stops the writer threads.
    """

    def __init__(
        self,
        directory: str | Path,
        table: ShardTable,
        options: CheckpointOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.table = table
        self.options = options or CheckpointOptions()
        self.stats = CheckpointStats()
        self.durable_stream_id: str | None = None  # the stream may be trimmed up to here
        self._clock = clock
        self._n = 0  # cuts so far
        self._stream_id = ""  # stream id of the last cut
        self._last_cut = clock()
        self._chain: _Chain | None = None  # as it will be once every submitted job ran
        self._base: _Base | None = None
        self._base_retry_at = 0.0
        self._pieces: set[str] = set()  # names on disk that this object knows of
        self._epoch = 0
        self._failed_epoch = -1  # written by the commit thread
        self._shas: dict[str, str] = {}  # meta.json sha256 of written deltas (commit thread)
        self._jobs: deque[tuple[Future[Any], str, Any]] = deque()
        self._commit = ThreadPoolExecutor(1, thread_name_prefix="ckpt-commit")

    # ------------------------------------------------------------ restart
    def restore(self) -> str | None:
        """Load the chain CURRENT names into the (empty) table; returns its stream id.

        Without CURRENT (a fresh directory) writes an empty base at once, so the first
        delta has something to extend, and returns None.
        """
        path = self.directory / CURRENT
        if not path.exists():
            self._cleanup(keep=set())
            self.table.stop_change_tracking()
            self.sync("0-0")
            return None
        info = json.loads(path.read_text())
        self.table.stop_change_tracking()
        if "checkpoint" in info:  # one full export, written before checkpoints were incremental
            import_table(self.table, self.directory / info["checkpoint"])
            self._pieces = {info["checkpoint"]}
            self._stream_id = self.durable_stream_id = str(info["stream_id"])
            self._cleanup(keep=self._pieces)
            return self._stream_id  # tracking stays off: the first cut starts a base
        chain = _Chain.from_json(info)
        self._load(chain)
        self.table.start_change_tracking(self.options.tracking_limit)
        self._chain = chain
        self._n, self._stream_id = chain.cut, chain.stream_id
        self.durable_stream_id = chain.stream_id
        self._pieces = chain.names()
        self._cleanup(keep=self._pieces)
        return chain.stream_id

    def replace(self) -> None:
        """The table was loaded from elsewhere (a snapshot): the next cut starts a base, and
        what the directory holds is deleted once that base is durable (not before: until
        then a crash restarts from it)."""
        self._pieces = {e.name for e in self.directory.iterdir() if e.name.startswith(_PREFIX)}
        self._n = max((_cut_of(name) for name in self._pieces), default=0)
        self.table.stop_change_tracking()

    def _verified(self, piece: _Piece, sub: str = "") -> Path:
        path = self.directory / piece.name / sub if sub else self.directory / piece.name
        try:
            ok = _sha256(path / "meta.json") == piece.meta_sha256
        except OSError as exc:
            raise CheckpointError(f"{path}: unreadable ({exc})") from None
        if not ok:
            raise CheckpointError(f"{path}/meta.json does not match CURRENT (sha256)")
        return path

    def _load(self, chain: _Chain) -> None:
        table, base = self.table, chain.base
        try:
            if base.cold_rows is not None:
                cold = table.cold_tier
                if cold is None:
                    raise CheckpointError(
                        f"{self.directory / base.name} holds a cold tier: restart with a hot "
                        "budget (and SSD tier), or restore a snapshot"
                    )
                cold.restore(self.directory / base.name / "cold")
                if cold.count() != base.cold_rows:
                    raise CheckpointError(
                        f"{base.name}/cold holds {cold.count()} rows, CURRENT says {base.cold_rows}"
                    )
            import_table(table, self._verified(base, "rows"))
            for delta in chain.deltas:
                path = self._verified(delta)
                import_table(table, path)
                table.remove(read_deleted(path))
        except (ExportError, ValueError, OSError) as exc:
            raise CheckpointError(f"cannot load checkpoint {self.directory}: {exc}") from None

    def _cleanup(self, keep: set[str]) -> None:
        """Delete what a crash left behind: pieces CURRENT does not name, temp files."""
        for entry in self.directory.iterdir():
            name = entry.name
            stale = name.startswith((_PREFIX, "." + _PREFIX)) and name not in keep
            if stale or name == CURRENT + ".tmp":
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    # ------------------------------------------------------------ the loop
    def step(self, stream_id: str) -> None:
        """Once per apply round: notice finished writes, advance a base, cut when due."""
        self._poll()
        base = self._base
        if base is not None:
            self._advance_base(base, self.options.base_slice_budget_s)
        table = self.table
        due = self._clock() - self._last_cut >= self.options.interval_s
        if (
            not table.tracking_changes
            or table.changed_rows >= self.options.max_delta_rows
            or (base is not None and self._needs_closing_cut(base))
            or (due and (table.changed_rows > 0 or stream_id != self._stream_id))
            or (due and self._base is None and self._compaction_due())
        ):
            self.cut(stream_id)
        self._maybe_switch()

    def cut(self, stream_id: str) -> None:
        """Checkpoint here: a delta of the rows changed since the last cut (written in the
        background), or the start of a base when no delta can describe them."""
        changes = self.table.cut_changes()
        self._n += 1
        n = self._n
        self._stream_id, self._last_cut = stream_id, self._clock()
        self.stats.cuts += 1
        if changes is None:  # no delta can describe this: every chain ends here
            self._cancel_base()
            self._start_base(n)
            return
        delta = _Piece(f"{_PREFIX}{n:010d}-delta", n, len(changes), stream_id)
        chain = self._chain
        extends = chain is not None and chain.cut == n - 1
        if extends:
            assert chain is not None
            chain = self._chain = chain.extended(delta)
        base = self._base
        if base is not None:
            base.deltas.append(delta)
        elif (not extends or self._compaction_due()) and self._clock() >= self._base_retry_at:
            self._start_base(n)  # changes after this cut go to the new base's deltas
        if extends or base is not None:
            self._pieces.add(delta.name)
            self._submit(
                "delta", delta, self._write_delta, delta, changes, chain if extends else None
            )
        self._maybe_switch()

    def sync(self, stream_id: str) -> None:
        """Checkpoint now and wait until it is durable (shutdown, after a snapshot restore)."""
        self.cut(stream_id)
        base = self._base
        if base is not None:
            chain = self._chain
            if chain is not None and chain.cut == self._n:
                self._cancel_base()  # the chain is current: no need to wait for the base
            else:
                self._advance_base(base, float("inf"), block=True)
                if base.scanned_at is not None:
                    self.cut(stream_id)  # the delta that closes the base
                base.future.exception()  # waits for the writer
                self._maybe_switch()
        self.wait()

    def wait(self) -> None:
        """Block until every submitted write has finished (and been noticed)."""
        while self._jobs:
            self._jobs[0][0].exception()  # waits
            self._poll()

    def close(self) -> None:
        """Stop the writer threads (an unfinished base is abandoned)."""
        self._cancel_base()
        self.wait()
        self._commit.shutdown(wait=True)

    # ------------------------------------------------------------ bases
    def _compaction_due(self) -> bool:
        chain = self._chain
        if chain is None:
            return True
        size = max(len(self.table), self.options.max_delta_rows)
        return chain.delta_rows > self.options.compact_fraction * size

    def _start_base(self, cut: int) -> None:
        path = self.directory / f"{_PREFIX}{cut:010d}-base"
        shutil.rmtree(path, ignore_errors=True)
        try:
            path.mkdir()
        except OSError as exc:
            self._base_failed(exc)
            return
        slices: queue.Queue[Any] = queue.Queue(maxsize=self.options.base_queue_slices)
        cancelled = threading.Event()
        future = _in_thread(self._write_base_rows, path, slices, cancelled)
        self._base = _Base(cut, path, self.table.hot_slot_end, slices, cancelled, future)
        self._pieces.add(path.name)

    def _advance_base(self, base: _Base, budget_s: float, block: bool = False) -> None:
        """Read hot slices within ``budget_s`` (at least one), then checkpoint the cold tier."""
        table, rows = self.table, self.options.base_slice_rows
        start = time.perf_counter()
        while not base.hot_scanned:
            if not block and base.slices.full():
                break
            if not base.put(table.hot_rows_between(base.pos, base.pos + rows), block):
                return  # (only when the writer stopped: a full queue was checked above)
            base.pos += rows
            if time.perf_counter() - start >= budget_s:
                break
        if base.hot_scanned and not base.end_sent:
            if not base.put(_END, block):
                return
            base.end_sent = True
        cold = table.cold_tier
        if cold is not None and base.cold_rows is None:
            # Start flushing while the hot scan runs; checkpoint only after it ended, so
            # that every unchanged row left the hot tier before the copy or was read hot.
            ready = cold.prepare_checkpoint()
            if not base.hot_scanned:
                return
            if base.cold_since is None:
                base.cold_since = time.monotonic()
            waited = time.monotonic() - base.cold_since
            while block and not ready and waited < self.options.cold_wait_s:
                time.sleep(0.005)
                ready, waited = cold.prepare_checkpoint(), time.monotonic() - base.cold_since
            if not ready and waited < self.options.cold_wait_s:
                return
            if not ready:
                log.warning(
                    "%s: cold tier not ready for a cheap checkpoint after %.0f s; "
                    "checkpointing it now (the apply loop waits for RocksDB)",
                    self.directory,
                    waited,
                )
            try:
                cold.checkpoint(base.path / "cold")
            except Exception as exc:  # a full disk must not stop the apply loop
                self._base_failed(exc)
                return
            base.cold_rows = cold.count()
            self.stats.base_bytes += _dir_bytes(base.path / "cold")
        if base.hot_scanned and base.scanned_at is None:
            base.scanned_at = self._n

    def _needs_closing_cut(self, base: _Base) -> bool:
        return base.scanned_at is not None and not (
            base.deltas and base.deltas[-1].cut > base.scanned_at
        )

    def _maybe_switch(self) -> None:
        """Make a finished base (+ a delta cut after its scan) the chain CURRENT names."""
        base = self._base
        if base is None or not base.future.done():
            return
        exc = base.future.exception()
        if exc is not None:
            self._base_failed(exc)
            return
        if base.scanned_at is None or self._needs_closing_cut(base):
            return
        sha, rows, written = base.future.result()
        self.stats.bases += 1
        self.stats.base_bytes += written
        piece = _Piece(base.name, base.cut, rows, "", sha, base.cold_rows)
        last = base.deltas[-1]
        chain = _Chain(piece, tuple(base.deltas), last.cut, last.stream_id)
        remove = sorted(self._pieces - chain.names())
        self._base, self._chain, self._pieces = None, chain, chain.names()
        self._submit("commit", chain, self._write_current, chain, remove)

    def _cancel_base(self) -> None:
        """Abandon the base being written, without waiting for its writer."""
        base, self._base = self._base, None
        if base is None:
            return
        base.cancelled.set()
        with contextlib.suppress(queue.Full):  # when full, the writer is busy, not waiting
            base.slices.put_nowait(_WAKE)  # a writer waiting for a slice sees the flag
        self._pieces.discard(base.name)  # its writer removes the directory

    def _base_failed(self, exc: BaseException | None) -> None:
        log.error("%s: writing a checkpoint base failed: %s", self.directory, exc)
        self.stats.failures += 1
        self._cancel_base()
        self._base_retry_at = self._clock() + self.options.interval_s

    # ------------------------------------------------------------ writes (other threads)
    def _write_base_rows(
        self, path: Path, slices: queue.Queue[Any], cancelled: threading.Event
    ) -> tuple[str, int, int]:
        """Writer thread: stream the hot slices into ``path/rows``."""
        try:
            spec, width = self.table.spec, self.table.state_width
            meta = write_rows(path / "rows", spec, width, _slices(slices, cancelled))
            rows = path / "rows"
            return _sha256(rows / "meta.json"), int(meta["rows"]), _dir_bytes(rows)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise

    def _submit(self, kind: str, payload: Any, fn: Callable[..., Any], *args: Any) -> None:
        epoch = self._epoch

        def job() -> Any:
            if epoch <= self._failed_epoch:
                raise _Skipped(kind)
            try:
                return fn(*args)
            except BaseException:
                self._failed_epoch = epoch
                raise

        self._jobs.append((self._commit.submit(job), kind, payload))

    def _write_delta(
        self, delta: _Piece, changes: Changes, chain: _Chain | None
    ) -> tuple[int, bool]:
        """Commit thread: write the delta, then CURRENT when it extends the chain."""
        path = self.directory / delta.name
        info = {"kind": "delta", "cut": delta.cut, "stream_id": delta.stream_id}
        spec, width = self.table.spec, self.table.state_width
        write_rows(
            path, spec, width, [changes.rows], deleted=changes.deleted, info=info, overwrite=True
        )
        self._shas[delta.name] = _sha256(path / "meta.json")
        if chain is not None:
            self._write_current(chain, [])
        return _dir_bytes(path), chain is not None

    def _write_current(self, chain: _Chain, remove: list[str]) -> int:
        """Commit thread: point CURRENT at ``chain`` (atomically), then delete ``remove``."""
        _fsync_dir(self.directory)  # the pieces' names are durable before CURRENT names them
        tmp = self.directory / (CURRENT + ".tmp")
        with open(tmp, "w") as f:
            json.dump(chain.to_json(self._shas), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / CURRENT)
        _fsync_dir(self.directory)
        for name in remove:
            shutil.rmtree(self.directory / name, ignore_errors=True)
            self._shas.pop(name, None)
        return 0

    # ------------------------------------------------------------ results
    def _poll(self) -> None:
        """Notice finished jobs in order: advance the durable stream id, handle failures."""
        while self._jobs and self._jobs[0][0].done():
            future, kind, payload = self._jobs.popleft()
            exc = future.exception()
            if isinstance(exc, _Skipped):
                continue
            if exc is not None:
                self._job_failed(kind, exc)
                continue
            if kind == "delta":
                written, committed = future.result()
                self.stats.deltas += 1
                self.stats.delta_bytes += written
                self.stats.delta_rows += payload.rows
                if committed:
                    self._durable(payload.stream_id)
            else:
                self._durable(payload.stream_id)
        self._maybe_switch()

    def _durable(self, stream_id: str) -> None:
        self.durable_stream_id = stream_id
        self.stats.commits += 1

    def _job_failed(self, kind: str, exc: BaseException) -> None:
        """A write failed: later jobs were skipped, so CURRENT is the last durable chain.
        Deltas after it were lost, so only a new base can continue."""
        log.error("%s: writing a checkpoint %s failed: %s", self.directory, kind, exc)
        self.stats.failures += 1
        self._epoch += 1
        self._chain = None
        self._cancel_base()
        self.table.stop_change_tracking()  # the next cut starts a base
        # Whatever is on disk (the chain CURRENT still names included) goes once that
        # base is durable.
        self._pieces |= {e.name for e in self.directory.iterdir() if e.name.startswith(_PREFIX)}
