"""Trainer throughput and quality: a plain PyTorch loop, in process, and the full pipeline.

Usage: ``python benchmarks/train.py [--rows 200000] [--dataset synthetic|criteo]``.

Every case trains the same model (the layout's default DeepFM, ``default_model``) on
the same rows, once, in stream order, and reports what its rows/s bought: progressive
AUC (scikit-learn, every prediction made before its row was trained) and COPC (clicks
over predicted clicks). Cases, all measured in this run:

1. **plain torch** (the ceiling): the same ``CTRModel`` in a plain PyTorch loop, its
   sparse rows in full ``nn.Embedding``-style tables (ids mapped to rows up front, not
   timed) stepped by torch's sparse Adagrad, dense parameters by the same optimizers,
   batches of the established size, no cache, metrics, Kafka or PS;
2. **in-process**: :class:`~pipeline.train.trainer.Trainer` with the shipped defaults on
   :class:`~pipeline.train.backend.LocalBackend` (the shard servers' tables in process);
3. **pipeline**: 2 ``pipeline ps`` shard processes and 1 or 2 ``pipeline train``
   processes with the shipped defaults (``--threads 1`` each: the thread budget of a
   2-core box), a fresh consumer group and fresh tables per run, rows produced to the
   samples topic first. Rows/s is all rows over the span from the group's first to its
   last trained batch (process start, group join and idle exit are not counted);
4. **pipeline, established steps**: the same with ``--young-batch-rows`` equal to
   ``--batch-rows``, i.e. the steps the defaults take once a stream is established
   (1024-row passes from the first row): trainer scaling where it matters, on a long
   stream; their AUC is that of large steps on a cold start, not the defaults';
5. **pipeline, 32-row sync** (``--mode sync --batch-rows 32``): the configuration whose
   quality the defaults must match, for the speed ratio.

Then the **fixed cost per batch**: the in-process trainer (sync steps, a fixed batch
size) and the plain loop at two batch sizes; ``time per batch = fixed + rows x per-row``
is solved from the two points. Target: fixed cost at most 2x the plain loop's.

``x plain`` is rows/s over the plain loop's; ``x 1 trainer`` is the 2-trainer rate over
the 1-trainer rate (target >= 1.6 on this 2-core box); ``x sync32`` is a rate over the
32-row sync pipeline run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
import yaml
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, private_stack

from pipeline.codec.samplebatch import SampleBatch, concat, encode_batch
from pipeline.ingest.generator import TrafficConfig, TrafficGenerator
from pipeline.model.features import SparseInput, batch_ids
from pipeline.model.modules import build_model, set_output_bias
from pipeline.model.spec import ModelSpec
from pipeline.ps.spec import TableSpec
from pipeline.topics import apply_topics, load_topic_specs
from pipeline.train.defaults import default_model, default_tables
from pipeline.train.settings import TrainerSettings

ROOT = Path(__file__).resolve().parents[1]
CRITEO_TSV = ROOT.parent / "shared" / "data" / "criteo" / "train.tsv"
PREFIX = "bench."
SHARDS = 2
REPEATS = 3  # runs per fixed-cost point


@dataclass
class Run:
    """One case's rows/s and the quality it was bought at."""

    name: str
    rows: int
    seconds: float
    preds: np.ndarray
    labels: np.ndarray
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds

    @property
    def auc(self) -> float:
        return float(roc_auc_score(self.labels, self.preds))

    @property
    def copc(self) -> float:
        return float(self.labels.sum() / self.preds.sum())


# -- data and specs ------------------------------------------------------------
def load_rows(dataset: str, rows: int) -> SampleBatch:
    """``rows`` samples in stream order: the synthetic generator, or the Criteo sample
    repeated (later epochs see known ids)."""
    if dataset == "synthetic":
        gen = TrafficGenerator(TrafficConfig(seed=7))
        return concat([b for b, _ in gen.samples(rows, 8192)])
    from pipeline.ingest.adapters import open_dataset

    if not CRITEO_TSV.is_file():
        raise SystemExit(f"{CRITEO_TSV} not found (needed by --dataset criteo)")
    sample = concat(list(open_dataset(CRITEO_TSV).batches(8192)))
    repeats = -(-rows // sample.num_rows)
    return concat([sample] * repeats).slice(0, rows)


def specs(rows: SampleBatch, run: str) -> tuple[list[TableSpec], ModelSpec]:
    """The layout's default tables and DeepFM, named for ``run`` (every run starts empty)."""
    layout = rows.config
    return default_tables(layout, prefix=f"{run}_"), default_model(layout, prefix=f"{run}_")


# -- plain torch ---------------------------------------------------------------
def plain_torch(rows: SampleBatch, batch_rows: int, limit: int | None = None) -> Run:
    """The same model in a plain PyTorch loop over full tables with sparse Adagrad."""
    from pipeline.train.dense_opt import dense_optimizer

    tables, spec = specs(rows, "plain")
    n = rows.num_rows if limit is None else min(limit, rows.num_rows)
    batches = [rows.slice(s, min(s + batch_rows, n)) for s in range(0, n, batch_rows)]
    prepared = []
    all_ids = [batch_ids(b, spec.slots) for b in batches]
    vocab = np.unique(np.concatenate([ids.unique for ids in all_ids]))
    for batch, ids in zip(batches, all_ids, strict=True):
        prepared.append(
            (
                torch.from_numpy(np.searchsorted(vocab, ids.unique)),
                ids,
                torch.from_numpy(ids.index),
                torch.from_numpy(ids.offsets),
                torch.from_numpy(np.array(batch.dense, np.float32)),
                torch.from_numpy(np.array(batch.labels, np.float32)),
                torch.from_numpy(np.array(batch.weights, np.float32)),
            )
        )
    model = build_model(spec, seed=0)
    labels0 = np.asarray(batches[0].labels, np.float64)
    ctr = (labels0.sum() + 0.5) / (len(labels0) + 1.0)
    set_output_bias(model, float(np.log(ctr / (1 - ctr))))
    dense_opt = dense_optimizer(spec, model)
    by_name = {t.name: t for t in tables}
    sparse = {}
    for name, dim in spec.tables().items():
        table = by_name[name]
        init = 0.01 if table.initializer.kind == "uniform" else 0.0
        weight = torch.empty(len(vocab), dim).uniform_(-init, init).requires_grad_(True)
        opt = torch.optim.Adagrad(
            [weight], lr=table.optimizer.lr, initial_accumulator_value=0.1
        )  # sparse gradients: only the batch's rows move
        sparse[name] = (weight, opt)
    params = list(model.parameters())
    preds: list[np.ndarray] = []
    began = time.perf_counter()
    for rows_t, ids, index, offsets, dense, labels, weights in prepared:
        inputs = {}
        for name, (weight, _) in sparse.items():
            leaf = torch.nn.functional.embedding(rows_t, weight, sparse=True)
            inputs[name] = SparseInput(
                leaf, index, offsets, ids.num_rows, ids.num_slots, one_hot=ids.one_hot
            )
        logits = model(inputs, dense)
        preds.append(torch.sigmoid(logits.detach()).numpy())
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, labels, weight=weights, reduction="sum"
        )
        for p in params:
            p.grad = None
        for weight, _ in sparse.values():
            weight.grad = None
        loss.backward()
        dense_grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(dense_grads, 1.0 / float(weights.sum()))
        dense_opt.step()
        for _, opt in sparse.values():
            opt.step()
    seconds = time.perf_counter() - began
    y = np.concatenate([np.asarray(b.labels) for b in batches])
    return Run("plain torch (ceiling)", n, seconds, np.concatenate(preds), y)


# -- in process ----------------------------------------------------------------
def in_process(
    rows: SampleBatch, settings: TrainerSettings, name: str, limit: int | None = None
) -> Run:
    """The Trainer on LocalBackend with ``settings``, rows cut as its schedule asks."""
    from pipeline.train.backend import LocalBackend
    from pipeline.train.trainer import RowSource, Trainer

    tables, spec = specs(rows, "local")
    if limit is not None:
        rows = rows.slice(0, min(limit, rows.num_rows))
    trainer = Trainer(
        spec,
        {t.name: t for t in tables},
        LocalBackend(tables),
        settings,
        keep_predictions=True,
    )
    began = time.perf_counter()
    result = trainer.run(RowSource(rows, settings.batch_rows))
    seconds = time.perf_counter() - began
    trainer.close()
    return Run(
        name,
        result.rows,
        seconds,
        np.concatenate(result.predictions),
        np.concatenate(result.labels),
        {"batches": result.batches},
    )


# -- pipeline ------------------------------------------------------------------
def _cli(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "--log-level", "info", "--threads", "1", *args],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        start_new_session=True,
        env={**os.environ, **env},
    )


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)


def produce(bootstrap: str, topic: str, rows: SampleBatch, partitions: int) -> float:
    """The rows as 1024-row messages, round-robin over the partitions; seconds taken."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    start = time.perf_counter()
    for i, lo in enumerate(range(0, rows.num_rows, 1024)):
        value = encode_batch(rows.slice(lo, min(lo + 1024, rows.num_rows)))
        while True:
            try:
                producer.produce(topic, value, partition=i % partitions)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    if producer.flush(120):
        raise SystemExit("produce: flush timed out")
    return time.perf_counter() - start


@contextlib.contextmanager
def shard_servers(catalog: Path, url: str, tmp: Path, tables: list[str]) -> Iterator[None]:
    """``SHARDS`` ``pipeline ps`` processes serving every table of ``catalog``."""
    procs = [
        _cli(
            ["ps", "--shard", str(s), "--shards", str(SHARDS), "--tables", str(catalog)],
            tmp / f"ps{s}.log",
            {"PIPELINE_REDIS_URL": url},
        )
        for s in range(SHARDS)
    ]
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 60
        while not all(client.exists(f"ps:table:{{{t}}}".encode()) for t in tables):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                logs = "\n".join((tmp / f"ps{s}.log").read_text()[-1500:] for s in range(SHARDS))
                raise SystemExit(f"shard servers did not start:\n{logs}")
            time.sleep(0.2)
        yield
    finally:
        _stop(procs)


def pipeline_run(
    name: str,
    run: str,
    trainers: int,
    extra: list[str],
    rows: SampleBatch,
    env: dict[str, str],
    tmp: Path,
    args: Any,
) -> Run:
    """``trainers`` ``pipeline train`` processes in one fresh consumer group."""
    _, spec = specs(rows, run)
    model = tmp / f"{run}.yaml"
    model.write_text(yaml.safe_dump(spec.to_dict()))
    base = [
        "train",
        "--config",
        str(model),
        "--tables",
        str(tmp / "tables.yaml"),
        "--job",
        run,
        "--device",
        args.device,
        "--idle-exit",
        str(args.idle_exit),
        "--json",
        *extra,
    ]
    procs = [
        _cli(
            [
                *base,
                "--trainer-id",
                f"{run}-t{n}",
                "--predictions-out",
                str(tmp / f"{run}-{n}.npz"),
            ],
            tmp / f"{run}-t{n}.log",
            env,
        )
        for n in range(trainers)
    ]
    results = []
    try:
        for n, p in enumerate(procs):
            out, _ = p.communicate(timeout=args.run_timeout)
            if p.returncode != 0:
                log = (tmp / f"{run}-t{n}.log").read_text()[-2000:]
                raise SystemExit(f"trainer {run}-t{n} failed ({p.returncode}):\n{log}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        _stop(procs)
    trained = sum(r["rows"] for r in results)
    if trained != rows.num_rows:
        print(f"  WARNING: {name} trained {trained} of {rows.num_rows} rows", file=sys.stderr)
    span = max(r["last_row_at"] for r in results) - min(
        r["first_row_at"] for r in results if r["rows"]
    )
    saved = [np.load(tmp / f"{run}-{n}.npz") for n in range(trainers)]
    return Run(
        name,
        trained,
        span,
        np.concatenate([s["predictions"] for s in saved]).astype(np.float64),
        np.concatenate([s["labels"] for s in saved]),
        {"split": "+".join(str(r["rows"]) for r in results)},
    )


def pipeline_cases(rows: SampleBatch, args: Any) -> list[Run]:
    established = ["--young-batch-rows", str(TrainerSettings().batch_rows)]
    cases = [
        ("pipeline, 1 trainer, defaults", 1, []),
        ("pipeline, 2 trainers, defaults", 2, []),
        ("pipeline, 1 trainer, established steps", 1, established),
        ("pipeline, 2 trainers, established steps", 2, established),
    ]
    if not args.skip_sync32:
        cases.append(
            ("pipeline, 1 trainer, 32-row sync", 1, ["--mode", "sync", "--batch-rows", "32"])
        )
    out = []
    with private_stack("train-bench-") as (stack, tmp):
        runs = [f"r{i}" for i in range(len(cases))]
        catalog = [t.to_dict() for run in runs for t in specs(rows, run)[0]]
        (tmp / "tables.yaml").write_text(yaml.safe_dump({"tables": catalog}))
        topics = load_topic_specs()
        apply_topics({"bootstrap.servers": stack.bootstrap}, topics, prefix=PREFIX)
        partitions = next(s.partitions for s in topics if s.name == "samples")
        produce_s = produce(stack.bootstrap, PREFIX + "samples", rows, partitions)
        print(f"produced {rows.num_rows:,} rows in {produce_s:.1f} s", file=sys.stderr)
        env = {
            "PIPELINE_KAFKA_BOOTSTRAP": stack.bootstrap,
            "PIPELINE_TOPICS_PREFIX": PREFIX,
            "PIPELINE_REDIS_URL": stack.redis_url,
            "PIPELINE_KAFKA_SESSION_TIMEOUT_MS": "6000",
        }
        with shard_servers(tmp / "tables.yaml", stack.redis_url, tmp, [t["name"] for t in catalog]):
            for (name, trainers, extra), run in zip(cases, runs, strict=True):
                got = pipeline_run(name, run, trainers, extra, rows, env, tmp, args)
                print(
                    f"{name}: {got.rows_per_s:,.0f} rows/s, AUC {got.auc:.4f}, "
                    f"rows per trainer {got.notes['split']}",
                    file=sys.stderr,
                )
                out.append(got)
    return out


# -- fixed cost per batch -------------------------------------------------------
def fixed_costs(rows: SampleBatch, sizes: tuple[int, int]) -> list[list[object]]:
    """Fixed ms per batch and us per row of the plain loop and the in-process trainer."""
    table: list[list[object]] = []
    fits = {}
    for label in ("plain torch", "in-process trainer (sync steps)"):
        per_batch = []
        for size in sizes:
            limit = min(rows.num_rows, max(40 * size, 20_000))
            times = []
            for _ in range(REPEATS):  # the fastest of a few: other processes share the box
                if label == "plain torch":
                    got = plain_torch(rows, size, limit)
                else:
                    settings = TrainerSettings(mode="sync", batch_rows=size, device="cpu")
                    got = in_process(rows, settings, label, limit)
                times.append(got.seconds / -(-got.rows // size))
            per_batch.append(min(times))
        per_row = (per_batch[1] - per_batch[0]) / (sizes[1] - sizes[0])
        fixed = per_batch[0] - per_row * sizes[0]
        fits[label] = fixed
        table.append([label, per_batch[0] * 1e3, per_batch[1] * 1e3, fixed * 1e3, per_row * 1e6])
    ratio = fits["in-process trainer (sync steps)"] / fits["plain torch"]
    table[-1].append(f"{ratio:.2f}x")
    table[0].append("1.00x")
    return table


def _versus(run: Run, ones: dict[str, Run]) -> str:
    """A pipeline run's rate over the 1-trainer run of the same configuration."""
    if not run.name.startswith("pipeline"):
        return "-"
    one = ones.get(run.name.split(", ", 2)[2])
    return f"{run.rows_per_s / one.rows_per_s:.2f}" if one else "-"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=200_000, help="samples trained per case")
    parser.add_argument("--dataset", choices=["synthetic", "criteo"], default="synthetic")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (all runs)")
    parser.add_argument("--idle-exit", type=float, default=10.0, help="trainers' --idle-exit (s)")
    parser.add_argument("--run-timeout", type=float, default=900.0)
    parser.add_argument("--skip-pipeline", action="store_true", help="in-process cases only")
    parser.add_argument("--skip-sync32", action="store_true", help="no 32-row sync pipeline run")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the budget of one trainer on this box, for every case
    rows = load_rows(args.dataset, args.rows)
    defaults = TrainerSettings(device=args.device)
    plain = plain_torch(rows, defaults.batch_rows)
    print(f"plain torch: {plain.rows_per_s:,.0f} rows/s", file=sys.stderr)
    runs = [plain, in_process(rows, defaults, "in-process, defaults")]
    if not args.skip_pipeline:
        runs += pipeline_cases(rows, args)
    base = plain.rows_per_s
    ones = {r.name.split(", ", 2)[2]: r for r in runs if r.name.startswith("pipeline, 1 trainer")}
    sync32 = next((r for r in runs if "32-row sync" in r.name), None)
    table = []
    for r in runs:
        table.append(
            [
                r.name,
                r.rows,
                r.rows_per_s,
                f"{r.rows_per_s / base:.2f}",
                _versus(r, ones),
                f"{r.rows_per_s / sync32.rows_per_s:.1f}" if sync32 else "-",
                f"{r.auc:.4f}",
                f"{r.copc:.3f}",
            ]
        )
    spec = specs(rows, "x")[1]
    print_table(
        f"Training, {args.dataset} data, {rows.num_rows:,} rows per case, {spec.kind} hidden "
        f"{list(spec.hidden)}, {len(spec.slots)} slots, {SHARDS} shard processes, "
        f"device {args.device}, 1 thread per trainer; defaults: {defaults.young_batch_rows}-row "
        f"synchronous steps growing to {defaults.batch_rows}-row passes of {defaults.pass_batches}",
        ["case", "rows", "rows/s", "x plain", "x 1 trainer", "x sync32", "prog AUC", "COPC"],
        table,
    )
    sizes = (64, 1024)
    print_table(
        f"Fixed cost per batch (time per batch = fixed + rows x per-row, from {sizes[0]}- and "
        f"{sizes[1]}-row batches, fastest of {REPEATS} runs each; target: at most 2x plain torch)",
        ["loop", f"ms/batch@{sizes[0]}", f"ms/batch@{sizes[1]}", "fixed ms", "us/row", "x plain"],
        fixed_costs(rows, sizes),
    )


if __name__ == "__main__":
    main()
