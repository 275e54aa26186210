"""CTR models in torch over sparse rows served by the parameter server's device cache.

:mod:`~pipeline.model.spec` describes a model (``deploy/models/*.yaml``),
:mod:`~pipeline.model.features` turns a SampleBatch into unique ids and bags, and
:mod:`~pipeline.model.modules` holds the LR / Wide&Deep / DeepFM modules.
"""

from __future__ import annotations

from pipeline.model.features import BatchIds, SparseInput, batch_ids, pooled, sparse_input
from pipeline.model.modules import (
    CTRModel,
    build_model,
    dense_state,
    load_dense_state,
    set_output_bias,
)
from pipeline.model.spec import ModelSpec

__all__ = [
    "BatchIds",
    "CTRModel",
    "ModelSpec",
    "SparseInput",
    "batch_ids",
    "build_model",
    "dense_state",
    "load_dense_state",
    "pooled",
    "set_output_bias",
    "sparse_input",
]
