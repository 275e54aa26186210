"""Peer online learners on the same stream: Vowpal Wabbit and River next to this project.

Every learner sees the same rows once, in file order, and is scored by progressive
validation: each row is predicted before it is learned, and the progressive AUC is
``roc_auc_score`` over all those predictions (log loss too). Rows/s is the learner's
own predict + learn time over the whole pass (feature strings are built beforehand
and not timed, so the peers are not charged for this project's parsing).

Learners (a row per variant):

* **VW** (``vowpalwabbit``, pyvw): ``--loss_function logistic -b 24 --link logistic``
  is the reference row; a few standard flags are tried next to it, only to report.
  Categorical slots are features ``C7=<id>`` in namespace ``c`` (hashed by VW), dense
  features ``I1:<value>`` in namespace ``d``.
* **River**: ``linear_model.LogisticRegression`` with ``optim.AdaGrad`` and with
  ``optim.FTRLProximal``; features are a dict of one-hot ``C7=<id>`` keys plus dense values.
* **in-process**: this project's PyTorch model trained in one process, no Kafka/PS
  (:func:`run_inprocess`);
* **PS, 2 shards**: the same against 2 shard servers (threads of this process) and a
  private redis-server (:func:`run_ps`);
* **pipeline**: this project end to end (Kafka -> ``pipeline train`` processes -> 2
  ``pipeline ps`` processes) with 1 and 2 trainers (:func:`run_pipeline`).

This project's rows come in two configurations: **32-row sync** (``--mode sync
--batch-rows 32``: small synchronous sparse steps, the quality reference) and the
**defaults** (``pipeline train`` with no tuning flags: the step schedule). After the
table, the defaults' targets are checked: AUC within 0.003 of 32-row sync and COPC in
[0.9, 1.1] everywhere, 10x the 32-row sync rows/s on streams of 1M rows, 2 pipeline
trainers within 0.005 AUC of one. The peers are benchmark-only extras
(``pip install -e '.[peers]'``); a missing one prints as "not installed".

Usage::

    python benchmarks/peers.py                       # the Criteo sample (train.tsv)
    python benchmarks/peers.py --dataset FILE [--format avazu] [--limit N]
    python benchmarks/peers.py --synthetic-rows 50000   # known optimum: prints Bayes AUC
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, private_stack

from pipeline.codec.samplebatch import SampleBatch, concat
from pipeline.errors import PipelineError
from pipeline.ingest.adapters import FORMATS, Dataset, open_dataset
from pipeline.ingest.generator import TrafficGenerator, exact_auc

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

#: The Criteo sample beside the project (``../shared/data``), as the tests find it.
CRITEO_TSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo" / "train.tsv"

#: VW flags of every variant; the first is the reference row named by the issue.
VW_BASE = "--loss_function logistic -b 24 --link logistic --quiet"
VW_VARIANTS = ("", "-l 0.1", "-l 1", "--ftrl", "-q cc")


HEADER = (
    *("learner", "config", "status", "rows/s", "prog AUC", "2nd half", "logloss", "COPC"),
    *("x sync32", "dAUC"),
)


class NotYet(Exception):
    """A learner this project does not have yet (printed as "not yet", not an error)."""


@dataclass
class Stream:
    """The rows every learner sees, in file order, plus how to re-read them.

    ``tokens[r]`` are row ``r``'s categorical features as ``"<slot>=<id>"`` strings
    (ids are already slot-qualified 64-bit hashes); ``dense[r]`` its dense values named
    ``dense_names``. ``batches`` are the same rows as SampleBatch (what a trainer eats);
    ``true_p`` is the generating probability of each row of a synthetic stream.
    """

    name: str
    dataset: Dataset
    batches: list[SampleBatch]
    labels: F32
    tokens: list[list[str]]
    dense: F32
    dense_names: tuple[str, ...]
    true_p: F64 | None = None

    @property
    def rows(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Result:
    """One learner's pass: its progressive predictions and the time it took."""

    learner: str
    config: str
    preds: F64 | None = None
    seconds: float = math.nan
    status: str = "ok"
    labels: F32 | None = None  # set when predictions are not in the stream's order

    @property
    def ok(self) -> bool:
        return self.preds is not None

    def rows_per_s(self) -> float:
        return len(self.preds) / self.seconds if self.preds is not None else math.nan


# ------------------------------------------------------------------------ the stream
def _tokens(batch: SampleBatch) -> list[list[str]]:
    """``"<slot>=<id>"`` per id, per row of ``batch`` (missing slots give no token)."""
    out: list[list[str]] = [[] for _ in range(batch.num_rows)]
    ids = batch.ids.tolist()
    for s, slot in enumerate(batch.slots):
        offs = batch.offsets[s].tolist()
        for r in range(batch.num_rows):
            out[r].extend(f"{slot}={i}" for i in ids[offs[r] : offs[r + 1]])
    return out


def _stream(name: str, dataset: Dataset, batches: Sequence[SampleBatch], p: F64 | None) -> Stream:
    if not batches:
        raise PipelineError(f"{name}: no rows")
    whole = concat(list(batches))
    names = (
        tuple(f"I{j + 1}" for j in range(whole.dense_dim))
        if dataset.name.startswith("criteo")
        else tuple(f"d{j}" for j in range(whole.dense_dim))
    )
    return Stream(
        name=name,
        dataset=dataset,
        batches=list(batches),
        labels=np.asarray(whole.labels, dtype=np.float32),
        tokens=_tokens(whole),
        dense=np.asarray(whole.dense, dtype=np.float32),
        dense_names=names,
        true_p=p,
    )


def load_dataset(path: Path, format: str | None, limit: int | None) -> Stream:
    """A dataset file in file order (``limit`` rows at most)."""
    dataset = open_dataset(path, format)
    return _stream(
        f"{path.name} ({dataset.name.split(':')[0]})",
        dataset,
        list(dataset.batches(4096, limit)),
        None,
    )


def load_synthetic(rows: int, seed: int) -> Stream:
    """The first ``rows`` samples of the synthetic generator, with their true p."""
    gen = TrafficGenerator(seed=seed)
    batches, ps = [], []
    for batch, p in gen.samples(rows, 4096):
        batches.append(batch)
        ps.append(p)
    return _stream(f"synthetic seed={seed}", gen.dataset(rows), batches, np.concatenate(ps))


# ------------------------------------------------------------------------ the peers
def _vw_lines(stream: Stream) -> list[str]:
    """VW text features (no label): ``|c C7=<id> ... |d I1:0.69 ...`` per row."""
    names = stream.dense_names
    lines = []
    for r, toks in enumerate(stream.tokens):
        dense = " ".join(
            f"{n}:{v:.6g}" for n, v in zip(names, stream.dense[r].tolist(), strict=True) if v
        )
        lines.append(f"|c {' '.join(toks)}" + (f" |d {dense}" if dense else ""))
    return lines


def run_vw(stream: Stream, extra: str) -> Result:
    """Vowpal Wabbit, logistic loss: predict each row (probability), then learn it."""
    from vowpalwabbit import Workspace  # type: ignore[import-untyped]

    labels = ("1" if y > 0.5 else "-1" for y in stream.labels.tolist())
    lines = [f"{y} {x}" for y, x in zip(labels, _vw_lines(stream), strict=True)]
    vw = Workspace(f"{VW_BASE} {extra}".strip())
    preds = np.empty(stream.rows, dtype=np.float64)
    start = time.perf_counter()
    for r, line in enumerate(lines):
        example = vw.parse(line)  # parsed once; predict() does not learn
        preds[r] = vw.predict(example)
        vw.learn(example)
        vw.finish_example(example)
    seconds = time.perf_counter() - start
    vw.finish()
    return Result("VW", f"logistic -b 24 {extra}".strip(), preds, seconds)


def _river_rows(stream: Stream) -> list[dict[str, float]]:
    names = stream.dense_names
    rows = []
    for r, toks in enumerate(stream.tokens):
        x = dict.fromkeys(toks, 1.0)
        x.update((n, v) for n, v in zip(names, stream.dense[r].tolist(), strict=True) if v)
        rows.append(x)
    return rows


def river_variants() -> list[tuple[str, Callable[[], Any]]]:
    """(config, model factory) of every River variant: AdaGrad and FTRL-Proximal."""
    from river import linear_model, optim

    def lr(opt: Any) -> Any:
        return linear_model.LogisticRegression(optimizer=opt)

    return [
        ("AdaGrad(lr=0.1) [default]", lambda: lr(optim.AdaGrad())),
        ("AdaGrad(lr=0.05)", lambda: lr(optim.AdaGrad(lr=0.05))),
        ("FTRLProximal(alpha=.05,beta=1,l1=0,l2=1) [default]", lambda: lr(optim.FTRLProximal())),
        (
            "FTRLProximal(alpha=.1,beta=1,l1=.1,l2=1)",
            lambda: lr(optim.FTRLProximal(alpha=0.1, beta=1.0, l1=0.1, l2=1.0)),
        ),
    ]


def run_river(stream: Stream, config: str, factory: Callable[[], Any]) -> Result:
    """River logistic regression: ``predict_proba_one`` then ``learn_one`` per row."""
    xs = _river_rows(stream)
    ys = [y > 0.5 for y in stream.labels.tolist()]
    model = factory()
    preds = np.empty(stream.rows, dtype=np.float64)
    start = time.perf_counter()
    for r, x in enumerate(xs):
        preds[r] = model.predict_proba_one(x).get(True, 0.0)
        model.learn_one(x, ys[r])
    return Result("River LogisticRegression", config, preds, time.perf_counter() - start)


# ------------------------------------------------------------------ this project
SYNC32 = "32-row sync"  # the accurate reference configuration: --mode sync --batch-rows 32
DEFAULTS = "defaults"  # what `pipeline train` does with no tuning flags
SYNC32_ROWS = 32


def _settings(config: str) -> Any:
    from pipeline.train.settings import TrainerSettings

    if config == SYNC32:
        return TrainerSettings(mode="sync", batch_rows=SYNC32_ROWS, device="cpu")
    return TrainerSettings(device="cpu")


DEFAULTS_TAG = "deepfm, defaults"


def _describe(config: str) -> str:
    if config == SYNC32:
        return f"deepfm, {SYNC32_ROWS}-row sync steps"
    s = _settings(config)
    return (
        f"deepfm, defaults ({s.young_batch_rows}-row sync steps growing to "
        f"{s.batch_rows}-row passes of {s.pass_batches})"
    )


def _train_batches(stream: Stream, rows: int) -> list[Any]:
    from pipeline.codec.samplebatch import concat
    from pipeline.train.batching import TrainBatch

    whole = concat(stream.batches)
    return [
        TrainBatch(whole.slice(lo, min(lo + rows, whole.num_rows)), (), 0)
        for lo in range(0, whole.num_rows, rows)
    ]


def _train(
    stream: Stream, backend_for: Callable[[list[Any]], Any], label: str, config: str
) -> Result:
    from pipeline.codec.samplebatch import concat
    from pipeline.train.defaults import default_model, default_tables
    from pipeline.train.trainer import RowSource, Trainer

    layout = stream.batches[0].config
    prefix = f"peers{os.getpid()}_{len(config)}_"
    tables = default_tables(layout, prefix)
    spec = default_model(layout, "deepfm", prefix)
    settings = _settings(config)
    backend = backend_for(tables)
    trainer = Trainer(spec, {t.name: t for t in tables}, backend, settings, keep_predictions=True)
    began = time.perf_counter()
    result = trainer.run(RowSource(concat(stream.batches), settings.batch_rows))
    seconds = time.perf_counter() - began
    trainer.close()
    preds = np.concatenate(result.predictions).astype(np.float64)
    return Result(label, _describe(config), preds, seconds)


def run_inprocess(stream: Stream, config: str = SYNC32) -> Result:
    """THIS PROJECT, in process: the Trainer on LocalBackend (no Kafka, no PS).

    DeepFM with the layout's default learning rates (pipeline.train.defaults), in the
    32-row sync configuration or with the shipped defaults (the step schedule).
    """
    from pipeline.train.backend import LocalBackend

    return _train(stream, LocalBackend, "in-process", config)


def run_ps(stream: Stream, config: str = SYNC32) -> Result:
    """THIS PROJECT on the parameter server: 2 shard servers + a private redis-server."""
    import threading

    import redis
    from _common import private_redis

    from pipeline.ps.client import PSClient
    from pipeline.ps.server import ServerOptions, ShardServer

    with private_redis() as url:
        stop = threading.Event()
        servers: list[Any] = []
        threads: list[threading.Thread] = []

        def backend_for(tables: list[Any]) -> Any:
            for shard in range(2):
                srv = ShardServer(
                    redis.Redis.from_url(url), tables, shard, 2, ServerOptions(block_ms=2)
                )
                servers.append(srv)
                threads.append(threading.Thread(target=srv.run, args=(stop,), daemon=True))
                threads[-1].start()
            return PSClient(redis.Redis.from_url(url), trainer_id="peers")

        try:
            return _train(stream, backend_for, "PS, 2 shards", config)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
            for srv in servers:
                srv.close()


def run_pipeline(stream: Stream, trainers: int, config: str = SYNC32) -> Result:
    """THIS PROJECT, end to end: samples topic -> ``trainers`` processes -> 2 PS shard processes.

    A private broker + redis-server; the stream's rows are produced first as 32-row
    SampleBatch messages over ``trainers`` partitions (file order within each), then
    ``pipeline train`` processes (same model and rates as in-process; the 32-row sync
    configuration or the defaults) train them in one consumer group. rows/s is
    measured from the first to the last trained batch over all trainers; the AUC is
    over every trainer's progressive predictions.
    """
    import json
    import signal
    import subprocess

    import redis
    import yaml
    from confluent_kafka import Producer

    from pipeline.codec.samplebatch import encode_batch
    from pipeline.topics import apply_topics, load_topic_specs
    from pipeline.train.defaults import default_model, default_tables
    from pipeline.train.metrics_sink import RedisMetricsSink

    with private_stack("peers-pipeline-", keep=True) as (stack, work):
        procs: list[subprocess.Popen[str]] = []
        try:
            layout = stream.batches[0].config
            prefix = f"p{trainers}_"
            tables = default_tables(layout, prefix)
            spec = default_model(layout, "deepfm", prefix)
            catalog, model = work / "tables.yaml", work / "model.yaml"
            catalog.write_text(yaml.safe_dump({"tables": [t.to_dict() for t in tables]}))
            model.write_text(yaml.safe_dump(spec.to_dict()))
            topic = "peers.samples"
            # every declared topic (samples has 6 partitions; only 0..trainers-1 get rows)
            apply_topics(
                {"bootstrap.servers": stack.bootstrap}, load_topic_specs(), prefix="peers."
            )
            producer = Producer({"bootstrap.servers": stack.bootstrap, "linger.ms": 5})
            for i, item in enumerate(_train_batches(stream, SYNC32_ROWS)):
                while True:
                    try:
                        producer.produce(topic, encode_batch(item.batch), partition=i % trainers)
                        break
                    except BufferError:
                        producer.poll(0.1)
                producer.poll(0)
            producer.flush(60)

            def cli(*args: str, log: str) -> subprocess.Popen[str]:
                p = subprocess.Popen(
                    # one thread each: the roles share this box (the thread budget)
                    [sys.executable, "-m", "pipeline.cli", "--threads", "1", *args],
                    stdout=subprocess.PIPE,
                    stderr=(work / log).open("w"),
                    text=True,
                    start_new_session=True,
                )
                procs.append(p)
                return p

            url = stack.redis_url
            for shard in range(2):
                cli(
                    "ps",
                    "--shard",
                    str(shard),
                    "--shards",
                    "2",
                    "--tables",
                    str(catalog),
                    "--redis-url",
                    url,
                    log=f"ps{shard}.log",
                )
            client = redis.Redis.from_url(url)
            deadline = time.monotonic() + 60
            while not client.exists(f"ps:table:{{{prefix}deep}}".encode()):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"shard servers did not start; see {work}")
                time.sleep(0.2)
            runners = [
                cli(
                    "train",
                    "--config",
                    str(model),
                    "--tables",
                    str(catalog),
                    "--job",
                    "peers",
                    "--trainer-id",
                    f"t{n}",
                    *(
                        ["--mode", "sync", "--batch-rows", str(SYNC32_ROWS)]
                        if config == SYNC32
                        else []
                    ),
                    "--json",
                    "--predictions-out",
                    str(work / f"t{n}.npz"),
                    "--bootstrap",
                    stack.bootstrap,
                    "--redis-url",
                    url,
                    "--prefix",
                    "peers.",
                    log=f"t{n}.log",
                )
                for n in range(trainers)
            ]
            sink = RedisMetricsSink(client, "peers")
            deadline = time.monotonic() + 3600
            while sink.global_cumulative()[0].summary()["samples"] < stream.rows:
                if time.monotonic() > deadline or any(p.poll() is not None for p in runners):
                    raise RuntimeError(f"trainers did not finish; see {work}")
                time.sleep(0.5)
            for p in runners:
                p.send_signal(signal.SIGTERM)
            summaries = [
                json.loads(p.communicate(timeout=60)[0].strip().splitlines()[-1]) for p in runners
            ]
            first = min(s["first_row_at"] for s in summaries if s["rows"])
            last = max(s["last_row_at"] for s in summaries if s["rows"])
            preds = [np.load(work / f"t{n}.npz") for n in range(trainers)]
            p_all = np.concatenate([d["predictions"] for d in preds]).astype(np.float64)
            y_all = np.concatenate([d["labels"] for d in preds])
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(30)
    described = f"{_describe(config)}, Kafka + 2 PS processes"
    # labels in the trainers' own order: the report scores these pairs
    return Result(
        "pipeline", f"{trainers} trainer(s): {described}", p_all, last - first, labels=y_all
    )


# --------------------------------------------------------------------------- report
def _log_loss(y: F32, p: F64) -> float:
    q = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))


def _auc(y: F32, p: F64) -> float:
    from sklearn.metrics import roc_auc_score  # type: ignore[import-untyped]

    return float(roc_auc_score(y, p))


def _attempt(learner: str, config: str, run: Callable[[], Result]) -> Result:
    try:
        return run()
    except NotYet as exc:
        return Result(learner, config, status=f"not yet ({exc})")
    except ImportError as exc:
        return Result(
            learner, config, status=f"not installed ({exc.name}; pip install -e '.[peers]')"
        )


def _copc(y: F32, p: F64) -> float:
    return float(y.sum() / p.sum())


def report(stream: Stream, results: Sequence[Result]) -> None:
    """The table: rows/s, progressive AUC (all rows, second half), log loss, COPC, ratios.

    Ratios are against this project's 32-row sync run in the same place (in process,
    on the PS, or through the pipeline; the in-process one for the peers): rows/s as a
    factor, AUC as a difference.
    """
    y = stream.labels
    half = stream.rows // 2
    rows: list[list[object]] = []
    for r in results:
        if r.preds is None:
            rows.append([r.learner, r.config, r.status, "", "", "", "", "", "", ""])
            continue
        yr = r.labels if r.labels is not None else y
        auc, rate = _auc(yr, r.preds), r.rows_per_s()
        base = _reference(r, results)
        base_rate = base.rows_per_s() if base else math.nan
        base_auc = (
            _auc(_labels(base, y), base.preds) if base and base.preds is not None else math.nan
        )
        rows.append(
            [
                r.learner,
                r.config,
                "ok",
                rate,
                f"{auc:.4f}",
                f"{_auc(yr[half:], r.preds[half:]):.4f}",
                f"{_log_loss(yr, r.preds):.4f}",
                f"{_copc(yr, r.preds):.3f}",
                "n/a" if math.isnan(base_rate) else f"{rate / base_rate:.2f}x",
                "n/a" if math.isnan(base_auc) else f"{auc - base_auc:+.4f}",
            ]
        )
    ctr = float(y.mean())
    title = (
        f"{stream.name}: {stream.rows:,} rows, CTR {ctr:.3f}, one pass in file order, "
        "progressive validation (predict, then learn)"
    )
    if stream.true_p is not None:
        title += f"; Bayes AUC of these rows {exact_auc(y, stream.true_p):.4f}"
    print_table(title, HEADER, rows)
    print_targets(stream, results)


def _labels(r: Result, y: F32) -> F32:
    return r.labels if r.labels is not None else y


def _reference(r: Result, results: Sequence[Result]) -> Result | None:
    """This project's 32-row sync run to compare ``r`` with (same learner; in-process for
    the peers and for 2-trainer pipeline runs, the 1-trainer pipeline run)."""
    learner = r.learner if r.learner in ("in-process", "PS, 2 shards", "pipeline") else "in-process"
    for cand in results:
        same = cand.learner == learner and cand.ok and SYNC32 in cand.config
        if same and (learner != "pipeline" or cand.config.startswith("1 trainer")):
            return cand
    return None


def print_targets(stream: Stream, results: Sequence[Result]) -> None:
    """The defaults' targets (issue 12, point 3), each with its measured figures.

    Quality: progressive AUC within 0.003 of the 32-row sync configuration and COPC in
    [0.9, 1.1], for the in-process, PS and pipeline runs; speed (streams of 1M rows
    and more): at least 10x the 32-row sync rows/s; 2 pipeline trainers within 0.005
    AUC of 1 trainer.
    """
    y = stream.labels
    lines = []
    for r in results:
        if not r.ok or DEFAULTS_TAG not in r.config:
            continue
        base = _reference(r, results)
        yr = _labels(r, y)
        auc, copc = _auc(yr, r.preds), _copc(yr, r.preds)
        where = f"{r.learner} {r.config.split(':')[0] if r.learner == 'pipeline' else ''}".strip()
        if base is not None:
            d = auc - _auc(_labels(base, y), base.preds)
            lines.append(
                f"{where}: AUC {auc:.4f} vs 32-row sync {auc - d:.4f} (diff {d:+.4f}, "
                f"target >= -0.003): {'ok' if d >= -0.003 else 'MISSED'}"
            )
            if stream.rows >= 1_000_000:
                x = r.rows_per_s() / base.rows_per_s()
                lines.append(
                    f"{where}: {x:.1f}x the 32-row sync rows/s (target >= 10x): "
                    f"{'ok' if x >= 10 else 'MISSED'}"
                )
        lines.append(
            f"{where}: COPC {copc:.3f} (target 0.9-1.1): {'ok' if 0.9 <= copc <= 1.1 else 'MISSED'}"
        )
    piped = [r for r in results if r.ok and r.learner == "pipeline" and DEFAULTS_TAG in r.config]
    one = next((r for r in piped if r.config.startswith("1 trainer")), None)
    two = next((r for r in piped if r.config.startswith("2 trainer")), None)
    if one and two:
        d = _auc(_labels(two, y), two.preds) - _auc(_labels(one, y), one.preds)
        lines.append(
            f"pipeline defaults: 2 trainers vs 1, AUC diff {d:+.4f} (target >= -0.005): "
            f"{'ok' if d >= -0.005 else 'MISSED'}"
        )
    if lines:
        print("\nTargets of the defaults (issue 12):")
        for line in lines:
            print(f"  {line}")


def run_all(stream: Stream, skip_pipeline: bool, vw_variants: Sequence[str]) -> None:
    """Every learner on ``stream``, then the table."""
    results = []
    for config in (SYNC32, DEFAULTS):
        results.append(_attempt("in-process", config, partial(run_inprocess, stream, config)))
    for config in (SYNC32, DEFAULTS):
        results.append(_attempt("PS, 2 shards", config, partial(run_ps, stream, config)))
    if not skip_pipeline:
        for n, config in ((1, SYNC32), (1, DEFAULTS), (2, DEFAULTS)):
            results.append(
                _attempt("pipeline", f"{n} trainer(s)", partial(run_pipeline, stream, n, config))
            )
    for flags in vw_variants:
        config = f"logistic -b 24 {flags}".strip()
        results.append(_attempt("VW", config, partial(run_vw, stream, flags)))
    try:
        variants = river_variants()
    except ImportError as exc:
        results.append(Result("River", "-", status=f"not installed ({exc.name})"))
    else:
        for config, factory in variants:
            learner = "River LogisticRegression"
            results.append(_attempt(learner, config, partial(run_river, stream, config, factory)))
    report(stream, results)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--dataset",
        type=Path,
        default=CRITEO_TSV,
        help="a dataset file (default: the Criteo sample train.tsv)",
    )
    ap.add_argument(
        "--format",
        choices=sorted(FORMATS),
        default=None,
        help="dataset format (detected when omitted)",
    )
    ap.add_argument("--limit", type=int, default=None, help="read at most this many rows")
    ap.add_argument(
        "--synthetic-rows",
        type=int,
        default=0,
        help="instead of --dataset: this many rows of the synthetic generator",
    )
    ap.add_argument("--seed", type=int, default=0, help="synthetic generator seed")
    ap.add_argument(
        "--skip-pipeline", action="store_true", help="do not run the end-to-end pipeline rows"
    )
    ap.add_argument(
        "--vw",
        choices=("all", "reference"),
        default="all",
        help="VW variants: the reference row only, or all",
    )
    args = ap.parse_args(argv)
    try:
        if args.synthetic_rows:
            stream = load_synthetic(args.synthetic_rows, args.seed)
        else:
            stream = load_dataset(args.dataset, args.format, args.limit)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    variants = VW_VARIANTS if args.vw == "all" else VW_VARIANTS[:1]
    run_all(stream, args.skip_pipeline, variants)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
