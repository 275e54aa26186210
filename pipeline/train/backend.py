"""Where a trainer's parameters live: the parameter server, or in-process tables.

:class:`~pipeline.ps.client.PSClient` is the production backend. :class:`LocalBackend`
holds the same :class:`~pipeline.ps.table.ShardTable` objects in the trainer's own
process and applies each push immediately: the same optimizers, admission and
initialization as the shard servers, with no Kafka, Redis or server in between.
It is the in-process reference the pipeline's quality is compared against, and
the way to train on a file without any services.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from pipeline.errors import PipelineError
from pipeline.ps.spec import TableSpec
from pipeline.ps.table import ShardTable

__all__ = ["LocalBackend", "SparseBackend"]

F32 = npt.NDArray[np.float32]


class SparseBackend(Protocol):
    """What the trainer needs from a parameter store (PSClient implements it)."""

    def pull(self, table: str, ids: np.ndarray) -> tuple[F32, npt.NDArray[np.bool_]]: ...

    def push(
        self,
        table: str,
        ids: np.ndarray,
        values: np.ndarray,
        shows: np.ndarray | None = None,
        clicks: np.ndarray | None = None,
        kind: str = "grad",
        max_event_time: int = 0,
        offsets: dict[str, dict[str, int]] | None = None,
    ) -> Any: ...

    def is_applied(self, receipt: Any) -> bool: ...

    def wait_applied(self, receipt: Any, timeout_s: float = 30.0) -> None: ...

    def flush(self, timeout_s: float = 60.0) -> None: ...

    def pull_dense(self, name: str) -> tuple[int, dict[str, np.ndarray]]: ...

    def dense_version(self, name: str) -> int: ...

    def push_dense(
        self, name: str, tensors: Mapping[str, np.ndarray], expected_version: int | None = None
    ) -> int: ...


class LocalBackend:
    """In-process tables with the shard servers' semantics; pushes apply at once."""

    def __init__(self, specs: Sequence[TableSpec]) -> None:
        self.tables = {spec.name: ShardTable(spec) for spec in specs}
        self._dense: dict[str, tuple[int, dict[str, np.ndarray]]] = {}
        self.pushes = 0

    def _table(self, table: str) -> ShardTable:
        try:
            return self.tables[table]
        except KeyError:
            raise PipelineError(f"unknown table {table!r} (have {sorted(self.tables)})") from None

    def pull(self, table: str, ids: np.ndarray) -> tuple[F32, npt.NDArray[np.bool_]]:
        found, weights = self._table(table).lookup(np.asarray(ids, dtype=np.uint64))
        return weights, found

    def push(
        self,
        table: str,
        ids: np.ndarray,
        values: np.ndarray,
        shows: np.ndarray | None = None,
        clicks: np.ndarray | None = None,
        kind: str = "grad",
        max_event_time: int = 0,
        offsets: dict[str, dict[str, int]] | None = None,
    ) -> None:
        target = self._table(table)
        ids = np.asarray(ids, dtype=np.uint64)
        values = np.asarray(values, dtype=np.float32).reshape(len(ids), target.dim)
        if kind == "delta":
            target.apply_delta(ids, values, shows, clicks)
        else:
            target.apply_push(ids, values, shows, clicks)
        self.pushes += 1

    def is_applied(self, receipt: Any) -> bool:
        return True

    def wait_applied(self, receipt: Any, timeout_s: float = 30.0) -> None:
        return None

    def flush(self, timeout_s: float = 60.0) -> None:
        return None

    def pull_dense(self, name: str) -> tuple[int, dict[str, np.ndarray]]:
        version, tensors = self._dense.get(name, (0, {}))
        return version, {k: v.copy() for k, v in tensors.items()}

    def dense_version(self, name: str) -> int:
        return self._dense.get(name, (0, {}))[0]

    def push_dense(
        self, name: str, tensors: Mapping[str, np.ndarray], expected_version: int | None = None
    ) -> int:
        version = self._dense.get(name, (0, {}))[0]
        if expected_version is not None and expected_version != version:
            from pipeline.ps.dense import DenseConflict

            raise DenseConflict(f"dense table {name!r} is at version {version}")
        self._dense[name] = (version + 1, {k: np.array(v, np.float32) for k, v in tensors.items()})
        return version + 1
