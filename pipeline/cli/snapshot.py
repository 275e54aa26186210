"""``pipeline snapshot run|list|verify|restore-dense``: thin layers over pipeline.snapshot."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import click

from pipeline.cli.options import redis_url_option
from pipeline.config import RedisSettings, load

__all__ = ["snapshot"]


@click.group()
def snapshot() -> None:
    """Consistent snapshots of the parameter server (take, list, verify, restore dense)."""


@snapshot.command("run")
@click.option("--dir", "directory", type=click.Path(file_okay=False), required=True)
@click.option("--interval", "interval_s", type=float, default=600.0, show_default=True)
@click.option("--keep", type=int, default=5, show_default=True, help="Newest snapshots kept")
@click.option(
    "--keep-daily", type=int, default=7, show_default=True, help="Plus the newest of each of N days"
)
@click.option(
    "--tables",
    "catalog",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Table catalog YAML (default: deploy/tables.yaml); all its tables are saved",
)
@click.option("--dense", multiple=True, help="Dense table to save as well (repeatable)")
@click.option("--name", default="default", show_default=True, help="Series (lock) name")
@click.option("--timeout", "timeout_s", type=float, default=300.0, show_default=True)
@click.option("--once", is_flag=True, help="Take one snapshot and exit")
@click.option(
    "--job",
    default=None,
    help="Trainer job whose live trainers place the barriers (exact offsets; docs/snapshots.md)",
)
@redis_url_option
def run(
    directory: str,
    interval_s: float,
    keep: int,
    keep_daily: int,
    catalog: str | None,
    dense: tuple[str, ...],
    name: str,
    timeout_s: float,
    once: bool,
    job: str | None,
    redis_url: str | None,
) -> None:
    """Take a snapshot every INTERVAL seconds into DIR (one active coordinator per name)."""
    from pipeline.ps.catalog import load_catalog
    from pipeline.ps.frontclient import connect
    from pipeline.snapshot.coordinator import SnapshotCoordinator, TakenSnapshot

    if keep < 1 or keep_daily < 0:
        raise click.BadParameter("--keep must be >= 1 and --keep-daily >= 0")
    specs = load_catalog(Path(catalog) if catalog else None)
    coordinator = SnapshotCoordinator(
        connect(load(RedisSettings, url=redis_url)),
        directory,
        [s.name for s in specs],
        dense,
        keep=keep,
        keep_daily=keep_daily,
        name=name,
        ack_timeout_s=timeout_s,
        job=job,
    )

    def report(t: TakenSnapshot) -> None:
        click.echo(f"snapshot {t.id} rows={t.rows} in {t.seconds:.2f}s -> {t.path}")
        if t.deleted:
            click.echo(f"retention deleted {t.deleted}")

    if once:
        try:
            report(coordinator.take())
        finally:
            coordinator.release()
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    coordinator.run(stop, interval_s, report)


@snapshot.command("list")
@click.argument("directory", type=click.Path(file_okay=False))
def list_(directory: str) -> None:
    """Complete snapshots under DIRECTORY, oldest first (unfinished ones are skipped)."""
    from pipeline.snapshot.layout import list_snapshots

    for snap in list_snapshots(directory):
        rows = {
            t: sum(p["rows"] for p in info["parts"].values())
            for t, info in snap.manifest["tables"].items()
        }
        click.echo(f"{snap.id}\t{snap.path}\trows={rows}")


@snapshot.command("verify")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest's offsets as JSON")
def verify(path: str, as_json: bool) -> None:
    """Verify every checksum of the snapshot at PATH and print its resume offsets."""
    from pipeline.snapshot.layout import load_snapshot

    snap = load_snapshot(path, full=True)
    if as_json:
        click.echo(json.dumps(snap.manifest["offsets"]))
        return
    click.echo(f"snapshot {snap.id}: ok")
    for (topic, partition), offset in sorted(snap.offsets().items()):
        click.echo(f"  {topic}[{partition}] -> {offset}")


@snapshot.command("restore-dense")
@click.argument("path", type=click.Path(file_okay=False))
@redis_url_option
def restore_dense(path: str, redis_url: str | None) -> None:
    """Write the snapshot's dense tables back to the PS (a new version of each)."""
    from pipeline.ps.frontclient import connect
    from pipeline.snapshot.layout import load_snapshot
    from pipeline.snapshot.restore import restore_dense as restore

    snap = load_snapshot(path)
    for name, version in restore(connect(load(RedisSettings, url=redis_url)), snap).items():
        click.echo(f"dense {name}: version {version}")
