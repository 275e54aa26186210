"""Batch ids, pooling and the CTR modules against naive references, full tables and
finite differences (float64)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.codec.samplebatch import SampleBatch, from_rows
from pipeline.codec.slots import SlotConfig
from pipeline.model import features
from pipeline.model.features import BatchIds, SparseInput, batch_ids, pooled, sparse_input
from pipeline.model.modules import (
    CTRModel,
    build_model,
    dense_state,
    fm_interaction,
    load_dense_state,
    set_output_bias,
)
from pipeline.model.spec import ModelSpec
from pipeline.ps.dense import pack_tensors, unpack_tensors
from tests.strategies import sample_batches

pytestmark = pytest.mark.unit

KINDS = ("lr", "wide_deep", "deepfm")
SLOTS = ("s0", "s1", "s2")


def random_batch(
    rng: np.random.Generator,
    n: int = 6,
    slots: tuple[str, ...] = SLOTS,
    dense_dim: int = 3,
    vocab: int = 10,
    max_per_row: int = 3,
) -> SampleBatch:
    """Ids drawn from [0, vocab) so a full table of ``vocab`` rows covers them; some bags empty."""
    features = [
        {
            s: rng.integers(0, vocab, rng.integers(0, max_per_row + 1)).astype(np.uint64)
            for s in slots
        }
        for _ in range(n)
    ]
    return from_rows(
        SlotConfig(slots, dense_dim),
        labels=rng.integers(0, 2, n).astype(np.float32),
        features=features,
        event_times=np.arange(n),
        dense=rng.normal(size=(n, dense_dim)).astype(np.float32),
    )


def spec_of(kind: str, **overrides: Any) -> ModelSpec:
    fields: dict[str, Any] = {
        "kind": kind,
        "slots": SLOTS,
        "dense_dim": 3,
        "deep_dim": 4,
        "hidden": (6, 5),
    }
    fields.update(overrides)
    return ModelSpec(**fields)


def leaves(
    ids: BatchIds, tables: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, SparseInput]]:
    """Rows of the batch's unique ids from full tables, as fresh leaves requiring grad."""
    rows = torch.from_numpy(ids.unique.astype(np.int64))
    weights = {t: full.detach()[rows].clone().requires_grad_(True) for t, full in tables.items()}
    return weights, {t: sparse_input(ids, w) for t, w in weights.items()}


def full_tables(
    spec: ModelSpec, vocab: int, dtype: torch.dtype, seed: int = 1
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        t: torch.randn(vocab, d, generator=g, dtype=dtype) * 0.3 for t, d in spec.tables().items()
    }


# ---------------------------------------------------------------- batch_ids


def naive_batch_ids(batch: SampleBatch, slots: list[str]) -> dict[str, Any]:
    occurrences: list[tuple[int, int]] = []  # (id, row) slot-major
    offsets: list[int] = []
    for slot in slots:
        for row in range(batch.num_rows):
            offsets.append(len(occurrences))
            occurrences += [(int(x), row) for x in batch.row_features(row)[slot]]
    unique = sorted({x for x, _ in occurrences})
    position = {x: i for i, x in enumerate(unique)}
    shows = Counter(x for x, _ in occurrences)
    clicks = Counter(x for x, row in occurrences if batch.labels[row] >= 0.5)
    return {
        "unique": unique,
        "index": [position[x] for x, _ in occurrences],
        "offsets": offsets,
        "shows": [shows[x] for x in unique],
        "clicks": [float(clicks[x]) for x in unique],
    }


@settings(max_examples=60, deadline=None)
@given(batch=sample_batches(max_slots=4, max_rows=8), data=st.data())
def test_batch_ids_matches_naive_reference(batch: SampleBatch, data: st.DataObject) -> None:
    # A subset of the batch's slots in a random order, as a model would ask for.
    slots = data.draw(st.permutations(batch.slots)).copy()
    slots = slots[: data.draw(st.integers(0, len(slots)))]
    ids = batch_ids(batch, slots)
    want = naive_batch_ids(batch, slots)
    assert ids.unique.dtype == np.uint64 and ids.index.dtype == np.int64
    assert ids.offsets.dtype == np.int64
    assert ids.unique.tolist() == want["unique"]
    assert ids.index.tolist() == want["index"]
    assert ids.offsets.tolist() == want["offsets"]
    assert (ids.num_rows, ids.num_slots) == (batch.num_rows, len(slots))
    assert ids.occurrences().tolist() == want["shows"]
    assert ids.clicks(batch.labels).tolist() == want["clicks"]


def test_batch_ids_on_a_sliced_batch_uses_global_offsets() -> None:
    # Slot 1's offsets do not start at 0: the global-position case of SampleBatch.offsets.
    batch = random_batch(np.random.default_rng(3), n=9).slice(2, 7)
    ids = batch_ids(batch, ["s2", "s0"])
    want = naive_batch_ids(batch, ["s2", "s0"])
    assert ids.index.tolist() == want["index"] and ids.offsets.tolist() == want["offsets"]


def test_batch_ids_errors() -> None:
    batch = random_batch(np.random.default_rng(0))
    with pytest.raises(KeyError, match="slot 'C9' is not in the batch"):
        batch_ids(batch, ["s0", "C9"])
    with pytest.raises(ValueError, match="duplicate"):
        batch_ids(batch, ["s0", "s0"])
    with pytest.raises(ValueError, match=r"labels: expected shape \(6,\)"):
        batch_ids(batch, ["s0"]).clicks(np.zeros(5))
    with pytest.raises(ValueError, match=r"weight: expected shape \["):
        sparse_input(batch_ids(batch, ["s0"]), torch.zeros(10_000, 2))


# ---------------------------------------------------------------- pooling and FM


def test_pooled_matches_a_loop_and_empty_bags_are_zero() -> None:
    rng = np.random.default_rng(1)
    batch = random_batch(rng, n=7)
    ids = batch_ids(batch, list(SLOTS))
    weight = torch.randn(ids.num_unique, 5, dtype=torch.float64)
    out = pooled(sparse_input(ids, weight))
    assert out.shape == (7, 3, 5)
    position = {int(x): i for i, x in enumerate(ids.unique)}
    for r in range(7):
        for s, slot in enumerate(SLOTS):
            want = torch.zeros(5, dtype=torch.float64)
            for x in batch.row_features(r)[slot]:
                want += weight[position[int(x)]]
            torch.testing.assert_close(out[r, s], want)


def test_pooling_routes_agree_on_sums_and_grads() -> None:
    """CPU pools with gather + index_add_, CUDA with embedding_bag: same values, same grads."""
    batch = random_batch(np.random.default_rng(6), n=20, vocab=15, max_per_row=4)
    ids = batch_ids(batch, ["s1", "s0", "s2"])
    results = []
    for route in (features._bag_sums, features._bag_sums_index_add):
        weight = torch.randn(
            ids.num_unique, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
        )
        weight.requires_grad_(True)
        sums = route(sparse_input(ids, weight))
        (sums * torch.arange(sums.numel(), dtype=torch.float64).view_as(sums)).sum().backward()
        results.append((sums.detach(), weight.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("max_per_row", [1, 3])
def test_one_hot_and_shared_bags_routes_agree_with_the_generic_one(max_per_row: int) -> None:
    """The trainer's fast paths (one id per bag: a gather; bags computed once) change nothing."""
    rng = np.random.default_rng(8)
    if max_per_row == 1:  # exactly one id per slot and row: the usual CTR layout
        batch = from_rows(
            SlotConfig(SLOTS, 0),
            labels=rng.integers(0, 2, 16).astype(np.float32),
            features=[
                {s: rng.integers(0, 12, 1).astype(np.uint64) for s in SLOTS} for _ in range(16)
            ],
            event_times=np.arange(16),
        )
    else:
        batch = random_batch(rng, n=16, vocab=12, max_per_row=max_per_row)
    ids = batch_ids(batch, list(SLOTS))
    assert ids.one_hot == (max_per_row == 1)
    assert ids.occurrence_rows().tolist() == naive_occurrence_rows(ids)
    base = torch.randn(
        ids.num_unique, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    results = []
    for fast in (False, True):
        weight = base.clone().requires_grad_(True)
        inp = sparse_input(ids, weight)
        # fast: one-hot gather (or shared bags); slow: the generic route for every batch
        fast_inp = inp._replace(bags=torch.from_numpy(ids.bags))
        inp = fast_inp if fast else inp._replace(one_hot=False)
        out = pooled(inp)
        (out * torch.arange(out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        results.append((out.detach(), weight.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def naive_occurrence_rows(ids: features.BatchIds) -> list[int]:
    rows = []
    ends = [*ids.offsets.tolist()[1:], len(ids.index)]
    for bag, (start, end) in enumerate(zip(ids.offsets.tolist(), ends, strict=True)):
        rows += [bag % ids.num_rows] * (end - start)
    return rows


def test_pooled_of_a_batch_without_ids() -> None:
    batch = random_batch(np.random.default_rng(0), n=4, max_per_row=0)
    ids = batch_ids(batch, list(SLOTS))
    weight = torch.zeros(0, 2, requires_grad=True)
    out = pooled(sparse_input(ids, weight))
    assert out.shape == (4, 3, 2) and not out.any()
    out.sum().backward()
    assert weight.grad is not None and weight.grad.shape == (0, 2)


def test_fm_interaction_matches_pairwise_loop() -> None:
    emb = torch.randn(5, 4, 3, dtype=torch.float64)
    want = torch.zeros(5, dtype=torch.float64)
    for i in range(4):
        for j in range(i + 1, 4):
            want += (emb[:, i] * emb[:, j]).sum(dim=1)
    torch.testing.assert_close(fm_interaction(emb), want)


# ---------------------------------------------------------------- the models


def test_lr_logit_by_hand() -> None:
    spec = ModelSpec(kind="lr", slots=("a", "b"), dense_dim=2, bias_init=0.25)
    batch = from_rows(
        SlotConfig(("b", "a", "unused"), 2),
        labels=[1, 0],
        features=[{"a": [7, 7], "b": 3, "unused": 9}, {"b": [5, 3]}],
        event_times=[0, 0],
        dense=[[1.0, 2.0], [-1.0, 0.5]],
    )
    model = build_model(spec)
    with torch.no_grad():
        model.dense_linear.weight.copy_(torch.tensor([[0.5, -2.0]]))  # type: ignore[union-attr]
    ids = batch_ids(batch, spec.slots)
    assert ids.unique.tolist() == [3, 5, 7]
    w = {3: 0.1, 5: -0.4, 7: 2.0}
    rows = torch.tensor([[w[int(x)]] for x in ids.unique])
    logits = model({"wide": sparse_input(ids, rows)}, torch.from_numpy(batch.dense))
    row0 = 0.25 + (2.0 + 2.0) + 0.1 + (0.5 * 1.0 - 2.0 * 2.0)
    row1 = 0.25 + (-0.4 + 0.1) + (0.5 * -1.0 - 2.0 * 0.5)
    torch.testing.assert_close(logits, torch.tensor([row0, row1]))


def reference_logits(
    model: CTRModel, batch: SampleBatch, tables: dict[str, nn.EmbeddingBag]
) -> torch.Tensor:
    """The same model computed with nn.EmbeddingBag over the full tables, slot by slot."""
    spec = model.spec
    dense = torch.from_numpy(batch.dense).to(model.bias.dtype)

    def fields(table: str) -> torch.Tensor:
        per_slot = []
        for slot in spec.slots:
            offsets, ids = batch.slot_ids(slot)
            ids_t = torch.from_numpy(ids.astype(np.int64))
            per_slot.append(tables[table](ids_t, torch.from_numpy(offsets[:-1].astype(np.int64))))
        return torch.stack(per_slot, dim=1)  # [N, S, d]

    logit = model.bias + fields(spec.wide_table).sum(dim=(1, 2))
    if model.dense_linear is not None:
        logit = logit + model.dense_linear(dense).squeeze(-1)
    if model.mlp is not None and spec.deep_table is not None:
        emb = fields(spec.deep_table)
        if spec.kind == "deepfm":
            logit = logit + fm_interaction(emb)
        logit = logit + model.mlp(torch.cat([emb.flatten(1), dense], dim=1)).squeeze(-1)
    return logit


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_leaf_grads_equal_full_table_grads(kind: str) -> None:
    """The leaf's .grad is the per-id sum over occurrences: the full table's grad rows."""
    rng = np.random.default_rng(7)
    batch = random_batch(rng, n=8, vocab=12)
    spec = spec_of(kind)
    model = build_model(spec, seed=3).double()
    reference = build_model(spec, seed=3).double()
    tables = full_tables(spec, 12, torch.float64)
    ids = batch_ids(batch, spec.slots)
    labels = torch.from_numpy(batch.labels).double()

    weights, inputs = leaves(ids, tables)
    logits = model(inputs, torch.from_numpy(batch.dense).double())
    F.binary_cross_entropy_with_logits(logits, labels, reduction="sum").backward()

    full = {
        t: nn.EmbeddingBag.from_pretrained(w.clone(), freeze=False, mode="sum")
        for t, w in tables.items()
    }
    want_logits = reference_logits(reference, batch, full)
    F.binary_cross_entropy_with_logits(want_logits, labels, reduction="sum").backward()

    torch.testing.assert_close(logits, want_logits)
    rows = torch.from_numpy(ids.unique.astype(np.int64))
    unseen = torch.ones(12, dtype=torch.bool)
    unseen[rows] = False
    for table, leaf in weights.items():
        grad, want = leaf.grad, full[table].weight.grad
        assert grad is not None and want is not None
        torch.testing.assert_close(grad, want[rows])
        assert not want[unseen].any()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_finite_differences(kind: str) -> None:
    rng = np.random.default_rng(11)
    batch = random_batch(rng, n=5, vocab=9)
    spec = spec_of(kind)
    model = build_model(spec, seed=5).double()
    ids = batch_ids(batch, spec.slots)
    weights, _ = leaves(ids, full_tables(spec, 9, torch.float64))
    names = list(weights)
    labels = torch.from_numpy(batch.labels).double()
    dense = torch.from_numpy(batch.dense).double().requires_grad_(True)

    def loss(dense: torch.Tensor, *rows: torch.Tensor) -> torch.Tensor:
        inputs = {t: sparse_input(ids, w) for t, w in zip(names, rows, strict=True)}
        return F.binary_cross_entropy_with_logits(model(inputs, dense), labels)

    assert torch.autograd.gradcheck(loss, (dense, *weights.values()), eps=1e-6, atol=1e-6)


def test_same_seed_same_dense_params_and_other_seed_differs() -> None:
    spec = spec_of("deepfm")
    a, b, c = (dense_state(build_model(spec, seed=s)) for s in (0, 0, 1))
    assert list(a) == list(b)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["mlp.0.weight"], c["mlp.0.weight"])
    assert a["bias"].tolist() == [0.0]


def test_dense_state_round_trips_through_the_dense_table_codec() -> None:
    rng = np.random.default_rng(2)
    batch = random_batch(rng)
    spec = spec_of("wide_deep")
    trained = build_model(spec, seed=0)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    state = dense_state(trained)
    assert all(v.dtype == np.float32 for v in state.values())
    state["bias"][0] += 0  # a copy: writing it must not touch the model
    fresh = build_model(spec, seed=9)
    load_dense_state(fresh, unpack_tensors(pack_tensors(state)))
    ids = batch_ids(batch, spec.slots)
    _, inputs = leaves(ids, full_tables(spec, 10, torch.float32))
    dense = torch.from_numpy(batch.dense)
    torch.testing.assert_close(fresh(inputs, dense), trained(inputs, dense), rtol=0, atol=0)


def test_load_dense_state_errors() -> None:
    model = build_model(spec_of("wide_deep"))
    state = dense_state(model)
    with pytest.raises(ValueError, match=r"missing \['bias'\], unexpected \[\]"):
        load_dense_state(model, {k: v for k, v in state.items() if k != "bias"})
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        load_dense_state(model, {**state, "extra": np.zeros(1)})
    with pytest.raises(
        ValueError, match=r"'mlp.0.weight': shape \[6, 3\], model expects \[6, 15\]"
    ):
        load_dense_state(model, {**state, "mlp.0.weight": np.zeros((6, 3))})


def test_output_bias_shifts_every_logit() -> None:
    batch = random_batch(np.random.default_rng(4))
    spec = spec_of("deepfm")
    model = build_model(spec)
    ids = batch_ids(batch, spec.slots)
    _, inputs = leaves(ids, full_tables(spec, 10, torch.float32))
    dense = torch.from_numpy(batch.dense)
    before = model(inputs, dense).detach()
    set_output_bias(model, -3.5)
    torch.testing.assert_close(model(inputs, dense).detach(), before - 3.5)
    with pytest.raises(ValueError, match="finite"):
        set_output_bias(model, float("inf"))
    assert build_model(replace(spec, bias_init=-2.0)).bias.item() == -2.0


def test_forward_rejects_mismatched_inputs() -> None:
    batch = random_batch(np.random.default_rng(5))
    spec = spec_of("wide_deep")
    model = build_model(spec)
    ids = batch_ids(batch, spec.slots)
    _, inputs = leaves(ids, full_tables(spec, 10, torch.float32))
    dense = torch.from_numpy(batch.dense)
    with pytest.raises(KeyError, match="no SparseInput for table 'deep' \\(got: wide\\)"):
        model({"wide": inputs["wide"]}, dense)
    two = batch_ids(batch, ["s0", "s1"])
    two_slots = sparse_input(two, torch.zeros(two.num_unique, 4))
    with pytest.raises(ValueError, match=r"'deep' input has \(rows, slots, dim\) \(6, 2, 4\)"):
        model({**inputs, "deep": two_slots}, dense)
    with pytest.raises(ValueError, match=r"dense must be \[N, 3\], got \[6, 2\]"):
        model(inputs, dense[:, :2])


# ---------------------------------------------------------------- devices


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False)"
)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_cpu(kind: str) -> None:
    batch = random_batch(np.random.default_rng(8), n=64, vocab=50)
    spec = spec_of(kind)
    ids = batch_ids(batch, spec.slots)
    tables = full_tables(spec, 50, torch.float32)
    results = []
    for device in ("cpu", "cuda"):
        model = build_model(spec, seed=0, device=device)
        weights, _ = leaves(ids, tables)
        weights = {t: w.detach().to(device).requires_grad_(True) for t, w in weights.items()}
        inputs = {t: sparse_input(ids, w) for t, w in weights.items()}
        labels = torch.from_numpy(batch.labels).to(device)
        logits = model(inputs, torch.from_numpy(batch.dense).to(device))
        F.binary_cross_entropy_with_logits(logits, labels).backward()
        grads = [w.grad.cpu() for w in weights.values() if w.grad is not None]
        grads += [p.grad.cpu() for p in model.parameters() if p.grad is not None]
        results.append((logits.detach().cpu(), grads))
    (cpu_logits, cpu_grads), (gpu_logits, gpu_grads) = results
    torch.testing.assert_close(gpu_logits, cpu_logits, rtol=1e-5, atol=1e-5)
    assert len(cpu_grads) == len(gpu_grads)
    for a, b in zip(gpu_grads, cpu_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
