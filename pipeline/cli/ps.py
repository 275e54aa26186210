"""``pipeline ps``: run one parameter-server shard server until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import click

from pipeline.cli.options import redis_url_option
from pipeline.config import PSSettings, RedisSettings, load
from pipeline.ps.catalog import load_catalog
from pipeline.ps.frontclient import connect
from pipeline.ps.server import ServerOptions, ShardServer

__all__ = ["ps"]

log = logging.getLogger(__name__)


@click.command()
@click.option("--shard", type=int, default=None, help="Shard index [env PIPELINE_PS_SHARD]")
@click.option("--shards", type=int, default=None, help="Shard count [env PIPELINE_PS_SHARDS]")
@click.option(
    "--tables",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Table catalog YAML [env PIPELINE_PS_TABLES]",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Checkpoints + SSD tier [env PIPELINE_PS_DATA_DIR]",
)
@click.option(
    "--hot-budget-rows",
    type=int,
    default=None,
    help="Rows in memory per table [env PIPELINE_PS_HOT_BUDGET_ROWS]",
)
@click.option(
    "--checkpoint-interval",
    "checkpoint_interval_s",
    type=float,
    default=None,
    help="Seconds between checkpoints [env PIPELINE_PS_CHECKPOINT_INTERVAL_S]",
)
@click.option(
    "--restore",
    type=click.Path(file_okay=False),
    default=None,
    help="Start from this snapshot directory (verified; see docs/snapshots.md)",
)
@redis_url_option
def ps(
    shard: int | None,
    shards: int | None,
    tables: str | None,
    data_dir: str | None,
    hot_budget_rows: int | None,
    checkpoint_interval_s: float | None,
    restore: str | None,
    redis_url: str | None,
) -> None:
    """Serve one shard of every table: apply pushes, update the pull view, checkpoint."""
    settings = load(
        PSSettings,
        shard=shard,
        shards=shards,
        tables=tables,
        data_dir=data_dir,
        hot_budget_rows=hot_budget_rows,
        checkpoint_interval_s=checkpoint_interval_s,
    )
    if settings.shard >= settings.shards:
        raise click.BadParameter(f"--shard {settings.shard} must be < --shards {settings.shards}")
    if settings.hot_budget_rows is not None and settings.data_dir is None:
        raise click.BadParameter("--hot-budget-rows needs --data-dir (the SSD tier lives there)")
    specs = load_catalog(settings.tables)
    client = connect(load(RedisSettings, url=redis_url))
    options = ServerOptions(
        data_dir=Path(settings.data_dir) if settings.data_dir else None,
        hot_budget_rows=settings.hot_budget_rows,
        checkpoint_interval_s=settings.checkpoint_interval_s,
        shrink_interval_s=settings.shrink_interval_s,
        read_count=settings.read_count,
        block_ms=settings.block_ms,
        cold_block_cache_bytes=settings.cold_block_cache_mb << 20,
        restore=Path(restore) if restore else None,
    )
    server = ShardServer(client, specs, settings.shard, settings.shards, options)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    names = ", ".join(f"{s.name}(dim {s.dim}, {s.optimizer.kind})" for s in specs)
    click.echo(f"ps shard {settings.shard}/{settings.shards}: {names}", err=True)
    started = time.monotonic()
    try:
        server.run(stop)
    finally:
        server.close()
    elapsed = time.monotonic() - started
    click.echo(
        f"ps shard {settings.shard}: applied {server.stats.entries} entries "
        f"({server.stats.rows} rows) in {elapsed:.0f} s; rejected {dict(server.stats.rejected)}",
        err=True,
    )
