"""``pipeline replay``: datasets into Kafka in event-time order, and topic history again.

``replay dataset`` sends a Criteo/Avazu/MovieLens/mapped-CSV file to ``samples``;
``replay topic`` re-reads a topic between two times or offsets into another topic, or
points a consumer group (trainers) at the start. Topic names get ``--prefix``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from pipeline.cli.options import bootstrap_option, prefix_option
from pipeline.config import KafkaSettings, TopicsSettings, load
from pipeline.errors import PipelineError
from pipeline.ingest.history import Bound, By, HistorySummary, replay_history
from pipeline.ingest.replay import ReplaySummary, replay_dataset
from pipeline.ingest.timeseek import parse_time

__all__ = ["replay"]


class _Group(click.Group):
    """Turns PipelineError into ``error: <message>`` and exit 1, also when run standalone."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=_Group)
def replay() -> None:
    """Replay a dataset file, or a topic's history, into Kafka."""


@replay.command("dataset")
@click.argument("source")
@click.option("--format", "fmt", default=None, help="criteo, avazu, movielens or csv [detected]")
@click.option("--mapping", default=None, help="YAML column mapping (format csv)")
@click.option("--topic", default="samples", show_default=True, help="Target topic")
@click.option(
    "--speedup",
    type=float,
    default=None,
    help="Pace by event time: 3600 plays one hour per second [as fast as possible]",
)
@click.option("--limit", type=int, default=None, help="Replay at most N rows")
@click.option("--batch-rows", type=int, default=1024, show_default=True, help="Rows per message")
@bootstrap_option
@prefix_option
def dataset(
    source: str,
    fmt: str | None,
    mapping: str | None,
    topic: str,
    speedup: float | None,
    limit: int | None,
    batch_rows: int,
    bootstrap: str | None,
    prefix: str | None,
) -> None:
    """Send the dataset at SOURCE to a topic as sample batches, in event-time order."""
    from pipeline.ingest.adapters import open_dataset  # parsers load only when used

    settings = load(KafkaSettings, bootstrap=bootstrap)
    physical = load(TopicsSettings, prefix=prefix).prefix + topic
    if not Path(source).exists():
        raise PipelineError(f"{source}: no such file or folder")
    if mapping is not None and not Path(mapping).is_file():
        raise PipelineError(f"{mapping}: no such mapping file")
    data = open_dataset(source, format=fmt, mapping=None if mapping is None else Path(mapping))
    with _progress(f"{data.name} -> {physical}", "rows") as update:
        summary = replay_dataset(
            settings,
            data,
            physical,
            speedup=speedup,
            batch_rows=batch_rows,
            limit=limit,
            on_progress=update,
        )
    click.echo(_dataset_report(data.name, summary))


@replay.command("topic")
@click.argument("source_topic")
@click.option("--from", "from_", metavar="TIME", help="Start time: ISO 8601 (UTC) or epoch ms")
@click.option("--to", "to", metavar="TIME", help="End time, exclusive [the current end]")
@click.option("--from-offset", metavar="N|P=N,..", help="Start offset, or per partition")
@click.option("--to-offset", metavar="N|P=N,..", help="End offset, exclusive, or per partition")
@click.option("--to-topic", metavar="TOPIC", help="Copy the selected messages to this topic")
@click.option("--into-group", metavar="GROUP", help="Commit the start offsets for this group")
@click.option("--partition", "partitions", type=int, multiple=True, help="Only these [all]")
@click.option(
    "--grace-ms",
    type=int,
    default=0,
    show_default=True,
    help="Read this far past --to for out-of-order timestamps",
)
@bootstrap_option
@prefix_option
def topic(
    source_topic: str,
    from_: str | None,
    to: str | None,
    from_offset: str | None,
    to_offset: str | None,
    to_topic: str | None,
    into_group: str | None,
    partitions: tuple[int, ...],
    grace_ms: int,
    bootstrap: str | None,
    prefix: str | None,
) -> None:
    """Re-read SOURCE_TOPIC between two times (or offsets), per partition.

    With --to-topic the messages with from <= timestamp < to are copied (keys, values,
    headers, timestamps and partition numbers kept). With --into-group the group's
    committed offsets move to the start, so its consumers (stopped first) resume
    there and continue into live data.
    """
    if (from_ is None) == (from_offset is None):
        raise click.UsageError("give exactly one of --from TIME or --from-offset N")
    if (from_ is None and to is not None) or (from_offset is None and to_offset is not None):
        raise click.UsageError("--to goes with --from, --to-offset with --from-offset")
    if (to_topic is None) == (into_group is None):
        raise click.UsageError("give exactly one of --to-topic TOPIC or --into-group GROUP")
    settings = load(KafkaSettings, bootstrap=bootstrap)
    names = load(TopicsSettings, prefix=prefix).prefix
    by: By = "time" if from_ is not None else "offset"
    start: Bound
    end: Bound | None
    if from_ is not None:
        start, end = parse_time(from_), None if to is None else parse_time(to)
    else:
        assert from_offset is not None
        start = _offsets(from_offset)
        end = None if to_offset is None else _offsets(to_offset)
    with _progress(f"{names}{source_topic}", "offsets") as update:
        summary = replay_history(
            settings,
            names + source_topic,
            start=start,
            end=end,
            by=by,
            target_topic=None if to_topic is None else names + to_topic,
            group=into_group,
            grace_ms=grace_ms,
            partitions=partitions or None,
            on_progress=update,
        )
    click.echo(_history_report(summary))


def _offsets(text: str) -> Bound:
    """``"100"`` (every partition) or ``"0=100,1=250"`` (per partition)."""
    try:
        if "=" not in text:
            return int(text)
        pairs = (item.split("=", 1) for item in text.split(",") if item.strip())
        return {int(p): int(o) for p, o in pairs}
    except ValueError:
        raise PipelineError(f"{text!r}: expected an offset N or P=N,P=N,...") from None


@contextlib.contextmanager
def _progress(what: str, unit: str) -> Iterator[Callable[[int, int | None], None]]:
    """A rich progress bar with ETA on stderr when it is a terminal, else a no-op."""
    if not sys.stderr.isatty():
        yield lambda _done, _total: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    console = Console(stderr=True)
    with Progress(*columns, TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(f"{what} ({unit})", total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    moment = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _dataset_report(name: str, s: ReplaySummary) -> str:
    pace = f", speedup {s.speedup:g}" if s.speedup else ""
    note = " (sorted by event time in memory)" if s.sorted_in_memory else ""
    return (
        f"replayed {s.rows:,} rows of {name} to {s.topic} in {s.batches:,} batches "
        f"({s.bytes / 1e6:.1f} MB) in {s.elapsed_s:.2f} s: {s.rows_per_s:,.0f} rows/s{pace}\n"
        f"event time {_when(s.first_event_ms)} .. {_when(s.last_event_ms)} "
        f"({s.event_span_ms / 1000:,.1f} s){note}"
    )


def _history_report(s: HistorySummary) -> str:
    spans = ", ".join(f"{r.partition}:[{r.start},{r.stop})" for r in s.ranges) or "none"
    if s.destination.startswith("group"):
        return f"{s.destination} now starts {s.source_topic} at offsets {spans}"
    skipped = f"; {s.skipped:,} out-of-bounds timestamps skipped" if s.skipped else ""
    return (
        f"copied {s.messages:,} messages ({s.bytes / 1e6:.1f} MB) from {s.source_topic} to "
        f"{s.destination.split(' ', 1)[1]} in {s.elapsed_s:.2f} s; offsets {spans}{skipped}"
    )
