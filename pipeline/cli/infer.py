"""``pipeline infer``: score a window of the samples topic with the PS model (no pushes)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from pipeline.cli.options import bootstrap_option, prefix_option, redis_url_option
from pipeline.codec.slots import SlotConfig
from pipeline.config import KafkaSettings, RedisSettings, TopicsSettings, load
from pipeline.errors import PipelineError
from pipeline.ps.client import PSClient
from pipeline.ps.frontclient import connect
from pipeline.train.infer import Inferencer
from pipeline.train.inmemory import InMemoryDataset
from pipeline.train.metrics import MetricCounts
from pipeline.train.runner import load_model_spec
from pipeline.train.settings import TrainerSettings

__all__ = ["infer"]


def _offsets(values: tuple[str, ...], flag: str) -> dict[int, int] | None:
    if not values:
        return None
    out = {}
    for value in values:
        try:
            partition, offset = value.split(":")
            out[int(partition)] = int(offset)
        except ValueError:
            raise click.BadParameter(f"{flag} takes PARTITION:OFFSET, got {value!r}") from None
    return out


@click.command()
@click.option(
    "--model",
    "kind",
    type=click.Choice(["lr", "wide_deep", "deepfm"]),
    default=None,
    help="Model kind (deploy/models/<kind>.yaml)",
)
@click.option("--config", "model", type=click.Path(dir_okay=False, exists=True), default=None)
@click.option("--start", "start", multiple=True, help="PARTITION:OFFSET to start from (repeat)")
@click.option("--end", "end", multiple=True, help="PARTITION:OFFSET to stop before (repeat)")
@click.option("--start-time", type=int, default=None, help="From this message time (ms)")
@click.option("--end-time", type=int, default=None, help="Before this message time (ms)")
@click.option("--rank", type=int, default=0, help="This process's share (distributed)")
@click.option("--world", type=int, default=1, help="Number of infer processes")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Predictions CSV")
@click.option("--export-embeddings", "slot", default=None, help="Slot whose embeddings to export")
@click.option("--embeddings-out", type=click.Path(dir_okay=False), default=None, help=".npz path")
@click.option("--batch-rows", type=int, default=4096, help="Rows scored per step")
@bootstrap_option
@prefix_option
@redis_url_option
def infer(
    kind: str | None,
    model: str | None,
    start: tuple[str, ...],
    end: tuple[str, ...],
    start_time: int | None,
    end_time: int | None,
    rank: int,
    world: int,
    out: str | None,
    slot: str | None,
    embeddings_out: str | None,
    batch_rows: int,
    bootstrap: str | None,
    prefix: str | None,
    redis_url: str | None,
) -> None:
    """Score a window of samples with the model on the PS, without pushing.

    Prints metrics of the window as JSON (AUC, log loss, ...). With --out writes
    ``row,label,prediction`` rows; with --export-embeddings SLOT writes the deep
    embeddings of that slot's admitted ids to --embeddings-out (npz: ids, vectors).
    """
    if slot is not None and embeddings_out is None:
        raise click.BadParameter("--export-embeddings needs --embeddings-out")
    settings = load(TrainerSettings, model=model)
    spec = load_model_spec(settings, kind)
    kafka = load(KafkaSettings, bootstrap=bootstrap)
    topic = load(TopicsSettings, prefix=prefix).prefix + settings.samples_topic
    data = InMemoryDataset.load(
        kafka,
        topic,
        SlotConfig(spec.slots, spec.dense_dim),
        start=_offsets(start, "--start"),
        end=_offsets(end, "--end"),
        start_time_ms=start_time,
        end_time_ms=end_time,
    )
    if world > 1:
        data = data.shard(rank, world, seed=0)
    ps = PSClient(connect(load(RedisSettings, url=redis_url)), trainer_id=f"infer-{rank}")
    for table in spec.tables():
        ps.route(table)
    inferencer = Inferencer(spec, ps)
    inferencer.load_dense()
    counts = MetricCounts()
    batches = [b.batch for b in data.batches(batch_rows) if b.batch is not None]
    preds, labels = [], []
    for batch in batches:
        p = inferencer.score(batch)
        counts.update(p, np.asarray(batch.labels), np.asarray(batch.weights))
        preds.append(p)
        labels.append(np.asarray(batch.labels))
    if out is not None:
        with Path(out).open("w") as fh:
            fh.write("row,label,prediction\n")
            row = 0
            for p, y in zip(preds, labels, strict=True):
                for label, pred in zip(y.tolist(), p.tolist(), strict=True):
                    fh.write(f"{row},{label:g},{pred:.8f}\n")
                    row += 1
    summary = {k: v for k, v in counts.summary().items()}
    summary["dense_version"] = inferencer.dense_version
    if slot is not None:
        assert embeddings_out is not None
        try:
            emb = inferencer.embeddings(slot, batches)
        except KeyError as exc:
            raise PipelineError(f"slot {slot!r} is not in the samples: {exc}") from None
        emb.save(embeddings_out)
        summary["embeddings"] = len(emb.ids)
    click.echo(json.dumps(summary))
