"""Trainer throughput: the full pipeline (Kafka -> PS -> commit) vs in-process PyTorch.

Usage: ``python benchmarks/train.py [--rows N] [--dataset synthetic|criteo] [--device cpu]``.

Starts its own embedded stack (broker + redis-server, free ports, temp dir), produces the
whole data set to the samples topic first, then runs, on the same rows and model:

1. **in-process** (the baseline): :class:`~pipeline.train.trainer.Trainer` with
   :class:`~pipeline.train.backend.LocalBackend` (in-process tables, the shard servers'
   optimizers) and the rows in memory (``IterSource``), sync mode: no Kafka, Redis or
   other process. This is what the PyTorch model costs on this machine. Run before and
   after the pipeline runs; the faster of the two is the baseline.
2. **pipeline** runs: 2 ``pipeline ps`` shard processes, then 1 or 2 ``pipeline train``
   processes (async mode) consuming the already-produced topic as a fresh consumer group
   each (every run reads every row; each run has its own tables, so none starts warm).
   Rows/s is all rows over the span from the first to the last trained batch of the
   group (``first_row_at`` / ``last_row_at`` of each trainer's ``--json``), so process
   start-up, the group join and the idle exit are not counted; rebalances are.

How to read the table:

* ``ratio`` is pipeline rows/s over in-process rows/s (the issue's target: >= 1.0 with
  the device cache). On a 2-core machine broker, Redis, both shard servers and the
  trainers share the cores with the model, so 2 trainers cannot scale here.
* ``cache`` is ``pass_batches/max_age_passes``: ``1/0`` is no device cache (every batch
  pulls its unique ids and pushes its gradients); ``8/0`` pulls each id once per pass of
  8 batches; ``8/4`` also reuses rows pulled up to 4 passes ago (staler rows).
* ``hit rate`` = 1 - pulled ids / the ids that pulling per batch would fetch (each
  batch's unique ids, per table): 0 without the cache.
* ``keys/row`` = (pulled + pushed ids, all tables) / trained rows: Redis rows read
  (MGET) and written (XADD entries, applied by the shard servers) per sample.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, private_stack

from pipeline.codec.samplebatch import SampleBatch, concat, encode_batch
from pipeline.ingest.generator import SLOTS, TrafficConfig, TrafficGenerator
from pipeline.model.spec import ModelSpec
from pipeline.ps.catalog import load_catalog
from pipeline.ps.spec import TableSpec
from pipeline.topics import apply_topics, load_topic_specs

ROOT = Path(__file__).resolve().parents[1]
CRITEO_TSV = ROOT.parent / "shared" / "data" / "criteo" / "train.tsv"
PREFIX = "bench."
SHARDS = 2


@dataclass(frozen=True)
class Case:
    """One pipeline run: trainer processes and their device-cache settings."""

    trainers: int
    pass_batches: int
    max_age: int

    @property
    def cache(self) -> str:
        return f"{self.pass_batches}/{self.max_age}"


CASES = (
    Case(1, 1, 0),  # no device cache
    Case(1, 8, 0),
    Case(1, 8, 4),
    Case(2, 8, 4),
)


# -- data and specs ------------------------------------------------------------
def load_rows(
    dataset: str, rows: int, message_rows: int
) -> tuple[list[SampleBatch], dict[str, Any]]:
    """Messages of ``message_rows`` rows, and the model spec (as a dict) that fits them."""
    model = yaml.safe_load((ROOT / "deploy" / "models" / "deepfm.yaml").read_text())
    if dataset == "synthetic":
        gen = TrafficGenerator(TrafficConfig(seed=7))
        model.update(slots=list(SLOTS), dense_dim=0)
        return [b for b, _ in gen.samples(rows, message_rows)], model
    from pipeline.ingest.adapters import open_dataset

    if not CRITEO_TSV.is_file():
        raise SystemExit(f"{CRITEO_TSV} not found (needed by --dataset criteo)")
    sample = concat(list(open_dataset(CRITEO_TSV).batches(8192)))
    # the sample (7,200 rows) repeated up to --rows: later epochs see known ids
    out = []
    for start in range(0, rows, message_rows):
        take = min(message_rows, rows - start)
        lo = start % sample.num_rows
        piece = sample.slice(lo, min(lo + take, sample.num_rows))
        if piece.num_rows < take:
            piece = concat([piece, sample.slice(0, take - piece.num_rows)])
        out.append(piece)
    return out, model


def run_tables(run: str) -> list[dict[str, Any]]:
    """The catalog's tables renamed ``<run>_<name>``: every run starts with empty tables."""
    out = []
    for spec in load_catalog():
        data = spec.to_dict()
        data["name"] = f"{run}_{spec.name}"
        out.append(data)
    return out


def run_model(model: dict[str, Any], run: str) -> dict[str, Any]:
    return {
        **model,
        "name": f"bench_{run}",
        "wide_table": f"{run}_wide",
        "deep_table": f"{run}_deep",
    }


# -- in-process baseline -------------------------------------------------------
def in_process(
    messages: list[SampleBatch], model: dict[str, Any], batch_rows: int, device: str
) -> dict[str, float]:
    """Trainer + LocalBackend + IterSource, sync mode: the same model, rows in memory."""
    from pipeline.train.backend import LocalBackend
    from pipeline.train.batching import TrainBatch
    from pipeline.train.settings import TrainerSettings
    from pipeline.train.trainer import IterSource, Trainer

    tables = {t["name"]: TableSpec.from_dict(t) for t in run_tables("local")}
    spec = ModelSpec.from_dict(run_model(model, "local"))
    rows = concat(messages)
    batches = [
        TrainBatch(rows.slice(s, min(s + batch_rows, rows.num_rows)), (), 0)
        for s in range(0, rows.num_rows, batch_rows)
    ]
    settings = TrainerSettings(mode="sync", batch_rows=batch_rows, device=device)
    trainer = Trainer(spec, tables, LocalBackend(list(tables.values())), settings)
    result = trainer.run(IterSource(batches))
    trainer.close()
    return {
        "rows": float(result.rows),
        "rows/s": result.rows / (result.last_row_at - result.first_row_at),
        "keys/row": (result.pulled_keys + result.pushed_keys) / result.rows,
        "hit": 1 - result.pulled_keys / result.batch_lookups,
    }


# -- pipeline ------------------------------------------------------------------
def _cli(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "--log-level", "info", *args],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        start_new_session=True,
        env={**os.environ, **env},
    )


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def produce(bootstrap: str, topic: str, messages: list[SampleBatch], partitions: int) -> float:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    start = time.perf_counter()
    for i, batch in enumerate(messages):
        while True:
            try:
                producer.produce(topic, encode_batch(batch), partition=i % partitions)
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
    case: Case, run: str, model: Path, catalog: Path, env: dict[str, str], args: Any, tmp: Path
) -> dict[str, float]:
    """``case.trainers`` trainer processes, one consumer group; their --json summaries merged."""
    base = [
        "train",
        "--config",
        str(model),
        "--tables",
        str(catalog),
        "--job",
        run,
        "--mode",
        "async",
        "--batch-rows",
        str(args.batch_rows),
        "--pass-batches",
        str(case.pass_batches),
        "--device",
        args.device,
        "--idle-exit",
        str(args.idle_exit),
        "--json",
    ]
    env = {**env, "PIPELINE_TRAIN_MAX_AGE_PASSES": str(case.max_age)}
    procs = [
        _cli([*base, "--trainer-id", f"{run}-t{n}"], tmp / f"{run}-t{n}.log", env)
        for n in range(case.trainers)
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
    rows = sum(r["rows"] for r in results)
    if not rows:
        logs = "\n".join((tmp / f"{run}-t{n}.log").read_text()[-1500:] for n in range(len(procs)))
        raise SystemExit(f"run {run}: no row trained (raise --idle-exit?)\n{logs}")
    span = max(r["last_row_at"] for r in results) - min(r["first_row_at"] for r in results)
    lookups = sum(r["batch_lookups"] for r in results)
    moved = sum(r["pulled_keys"] + r["pushed_keys"] for r in results)
    return {
        "rows": float(rows),
        "rows/s": rows / span,
        "keys/row": moved / rows,
        "hit": 1 - sum(r["pulled_keys"] for r in results) / lookups,
        "split": "+".join(str(r["rows"]) for r in results),  # type: ignore[dict-item]
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20_000, help="samples trained per run")
    parser.add_argument("--dataset", choices=["synthetic", "criteo"], default="synthetic")
    parser.add_argument("--batch-rows", type=int, default=256)
    parser.add_argument("--message-rows", type=int, default=1024, help="rows per Kafka message")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (all runs)")
    parser.add_argument("--idle-exit", type=float, default=10.0, help="trainers' --idle-exit (s)")
    parser.add_argument("--run-timeout", type=float, default=600.0)
    parser.add_argument(
        "--cases", default="all", help="pipeline runs: all, or e.g. '1:8:4,2:8:4' (trainers:pb:age)"
    )
    args = parser.parse_args()
    cases = (
        CASES
        if args.cases == "all"
        else tuple(Case(*map(int, c.split(":"))) for c in args.cases.split(","))
    )
    messages, model = load_rows(args.dataset, args.rows, args.message_rows)
    total = sum(m.num_rows for m in messages)
    local = in_process(messages, model, args.batch_rows, args.device)
    print(f"in-process: {local['rows/s']:,.0f} rows/s", file=sys.stderr)

    with private_stack("train-bench-") as (stack, tmp):
        table_rows = {}
        runs = [f"r{i}" for i in range(len(cases))]
        tables = [t for run in runs for t in run_tables(run)]
        catalog = tmp / "tables.yaml"
        catalog.write_text(yaml.safe_dump({"tables": tables}))
        specs = load_topic_specs()
        apply_topics({"bootstrap.servers": stack.bootstrap}, specs, prefix=PREFIX)
        partitions = next(s.partitions for s in specs if s.name == "samples")
        produce_s = produce(stack.bootstrap, PREFIX + "samples", messages, partitions)
        print(f"produced {total:,} rows in {produce_s:.1f} s", file=sys.stderr)
        env = {
            "PIPELINE_KAFKA_BOOTSTRAP": stack.bootstrap,
            "PIPELINE_TOPICS_PREFIX": PREFIX,
            "PIPELINE_REDIS_URL": stack.redis_url,
            "PIPELINE_KAFKA_SESSION_TIMEOUT_MS": "6000",
        }
        with shard_servers(catalog, stack.redis_url, tmp, [t["name"] for t in tables]):
            for case, run in zip(cases, runs, strict=True):
                model_path = tmp / f"{run}.yaml"
                model_path.write_text(yaml.safe_dump(run_model(model, run)))
                table_rows[case] = pipeline_run(case, run, model_path, catalog, env, args, tmp)
                got = table_rows[case]
                print(
                    f"{case.trainers} trainer(s), cache {case.cache}: "
                    f"{got['rows/s']:,.0f} rows/s, rows per trainer {got['split']}",
                    file=sys.stderr,
                )
                if int(got["rows"]) != total:
                    print(f"  WARNING: trained {got['rows']:.0f} of {total} rows")
    # the baseline again, after the pipeline runs: the best of both (a shared machine)
    again = in_process(messages, model, args.batch_rows, args.device)
    print(f"in-process again: {again['rows/s']:,.0f} rows/s", file=sys.stderr)
    local = max(local, again, key=lambda r: r["rows/s"])

    base = local["rows/s"]
    rows_out: list[list[object]] = [
        [
            "in-process (LocalBackend, sync)",
            "-",
            "-",
            local["rows/s"],
            1.0,
            local["hit"],
            local["keys/row"],
        ],
    ]
    for case, got in table_rows.items():
        rows_out.append(
            [
                f"pipeline, {case.trainers} trainer{'s' if case.trainers > 1 else ''}, async",
                case.cache,
                got["split"],
                got["rows/s"],
                got["rows/s"] / base,
                got["hit"],
                got["keys/row"],
            ]
        )
    model_desc = f"{model['kind']} hidden {model['hidden']}, {len(model['slots'])} slots"
    print_table(
        f"Training throughput, {args.dataset} data, {total:,} rows, {model_desc}, batch "
        f"{args.batch_rows}, {SHARDS} shard processes, device {args.device}",
        ["run", "cache", "rows/trainer", "rows/s", "ratio", "hit rate", "keys/row"],
        rows_out,
    )
    print(f"  data produced before the trainers start: {total / produce_s:,.0f} rows/s")
    print("  ratio = rows/s / in-process rows/s (target >= 1.0 with the device cache)")


if __name__ == "__main__":
    main()
