"""``pipeline smoke``: a verified round trip of sample batches through the broker."""

from __future__ import annotations

import click
import numpy as np

from pipeline.cli.options import bootstrap_option, prefix_option
from pipeline.config import KafkaSettings, TopicsSettings, load
from pipeline.smoke import CRITEO_LIKE, random_batch, roundtrip

__all__ = ["smoke"]


@click.command()
@bootstrap_option
@prefix_option
@click.option("--batches", default=20, show_default=True, help="Batches to send")
@click.option("--rows", default=1024, show_default=True, help="Samples per batch")
@click.option("--seed", default=0, show_default=True)
def smoke(bootstrap: str | None, prefix: str | None, batches: int, rows: int, seed: int) -> None:
    """Produce Criteo-like sample batches to `samples`, consume them back, verify, time it."""
    settings = load(KafkaSettings, bootstrap=bootstrap)
    topic = f"{load(TopicsSettings, prefix=prefix).prefix}samples"
    rng = np.random.default_rng(seed)
    data = [random_batch(CRITEO_LIKE, rows, rng) for _ in range(batches)]
    result = roundtrip(settings, topic, data)
    mb = result.bytes / 1e6
    click.echo(
        f"round trip through {topic} on {settings.bootstrap}: {result.batches} batches, "
        f"{result.samples} samples, {mb:.1f} MB, all equal"
    )
    click.echo(
        f"produce {result.samples / result.produce_s:,.0f} samples/s; consume (incl. group join) "
        f"{result.samples / result.consume_s:,.0f} samples/s"
    )
