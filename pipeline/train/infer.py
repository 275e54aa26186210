"""Infer mode: score samples with the current PS model without pushing anything.

Distributed prediction is several ``pipeline infer`` processes over disjoint shares
of the same window (``InMemoryDataset.shard``); the model is read, never written:
sparse rows come from the pull view (unadmitted ids read as zero vectors, exactly
as in training), dense parameters from the PS dense table. The same class exports
the embeddings of the ids seen in one slot (e.g. items) for a recall index.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from pipeline.arrayops import unique
from pipeline.codec.samplebatch import SampleBatch
from pipeline.errors import PipelineError
from pipeline.model.features import SparseInput, batch_ids
from pipeline.model.modules import build_model, load_dense_state
from pipeline.model.spec import ModelSpec
from pipeline.train.backend import SparseBackend

__all__ = ["Embeddings", "Inferencer"]

F32 = npt.NDArray[np.float32]
U64 = npt.NDArray[np.uint64]


@dataclass(frozen=True)
class Embeddings:
    """Rows of one table for the admitted ids seen in one slot."""

    slot: str
    table: str
    ids: U64
    vectors: F32

    def save(self, path: str) -> None:
        """An ``.npz`` with ``ids`` (uint64) and ``vectors`` (float32 [n, dim]); no pickle."""
        np.savez(path, ids=self.ids, vectors=self.vectors)


class Inferencer:
    """Scores batches with the model on the PS (pull view + dense table)."""

    def __init__(
        self, spec: ModelSpec, backend: SparseBackend, device: torch.device | str = "cpu"
    ) -> None:
        self.spec = spec
        self.backend = backend
        self.device = torch.device(device)
        self.model = build_model(spec, device=self.device)
        self.model.eval()
        self.dense_version = 0

    def load_dense(self) -> int:
        """Adopt the current dense parameters; error when nothing was trained yet."""
        version, tensors = self.backend.pull_dense(self.spec.dense_table_name())
        if version == 0:
            raise PipelineError(
                f"the PS holds no dense parameters for model {self.spec.name!r} "
                f"(table {self.spec.dense_table_name()!r}): train it first"
            )
        load_dense_state(self.model, tensors)
        self.dense_version = version
        return version

    @torch.no_grad()
    def score(self, batch: SampleBatch) -> F32:
        """Predicted click probabilities of every row of ``batch``."""
        if not self.dense_version:
            self.load_dense()
        ids = batch_ids(batch, self.spec.slots)
        index = torch.from_numpy(ids.index).to(self.device)
        offsets = torch.from_numpy(ids.offsets).to(self.device)
        inputs = {}
        for table in self.spec.tables():
            weights, _found = self.backend.pull(table, ids.unique)
            leaf = torch.from_numpy(np.ascontiguousarray(weights)).to(self.device)
            inputs[table] = SparseInput(leaf, index, offsets, ids.num_rows, ids.num_slots)
        dense = torch.from_numpy(np.require(batch.dense, np.float32, ["W"])).to(self.device)
        return torch.sigmoid(self.model(inputs, dense)).cpu().numpy()

    def embeddings(self, slot: str, batches: Iterable[SampleBatch]) -> Embeddings:
        """Deep-table rows of the admitted ids of ``slot`` in ``batches``."""
        table = self.spec.deep_table or self.spec.wide_table
        if slot not in self.spec.slots:
            raise PipelineError(f"slot {slot!r} is not one of the model's slots")
        parts = [batch.slot_ids(slot)[1] for batch in batches]
        ids = unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
        weights, found = self.backend.pull(table, ids)
        return Embeddings(slot, table, ids[found], weights[found])
