"""``pipeline produce``: validate records from a file or stdin and send them to a topic.

Impression/Click records go out one message each (keyed by request id, via
:class:`~pipeline.ingest.producer.EventProducer`); Sample records are batched into
SampleBatch messages by :class:`~pipeline.ingest.producer.SampleProducer`. Every
invalid line is reported with its number; any failure means exit code 1.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import click

from pipeline.cli.options import bootstrap_option, prefix_option
from pipeline.codec.errors import CodecError
from pipeline.codec.hashing import to_unsigned_int
from pipeline.codec.slots import SlotConfig
from pipeline.config import KafkaSettings, TopicsSettings, load
from pipeline.errors import PipelineError
from pipeline.ingest.filesource import (
    FORMATS,
    SourceError,
    SourceLine,
    coerce_flat,
    detect_format,
    infer_layout,
    read_source,
    sample_record,
)
from pipeline.ingest.producer import EventProducer, KeyFn, SampleProducer

__all__ = ["produce"]

SCHEMAS = ("Impression", "Click", "Sample")
#: Schema implied by a topic's logical name when --schema is not given.
TOPIC_SCHEMAS = {"events.impressions": "Impression", "events.clicks": "Click", "samples": "Sample"}
MAX_REPORTED = 100

SendFn = Callable[[dict[str, Any]], None]


@dataclass
class _Tally:
    read: int = 0
    invalid: int = 0
    first_bad_line: int | None = None


class _Pacer:
    """Sleeps so that at most ``rate`` records per second go out (None: no limit)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.count = 0

    def wait(self) -> None:
        if self.rate is None:
            return
        self.count += 1
        ahead = self.start + self.count / self.rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


@click.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--topic", required=True, help="Logical topic name (--prefix is prepended)")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default=None,
    help="Input format [default: from the extension; stdin: jsonl]",
)
@click.option(
    "--schema",
    type=click.Choice(SCHEMAS),
    default=None,
    help="Record schema [default: from the topic: events.impressions, events.clicks, samples]",
)
@click.option("--slots", default=None, help="Sample: comma-separated slots [default: as seen]")
@click.option("--dense-dim", type=click.IntRange(min=0), default=None, help="Sample: dense width")
@click.option("--key-slot", default=None, help="Sample: keep rows with the same id of it together")
@click.option("--batch-rows", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="Records/s at most")
@click.option(
    "--fail-fast/--skip-invalid", default=False, help="Stop at the first invalid record, or skip"
)
@click.option(
    "--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for delivery"
)
@bootstrap_option
@prefix_option
def produce(
    source: str,
    topic: str,
    fmt: str | None,
    schema: str | None,
    slots: str | None,
    dense_dim: int | None,
    key_slot: str | None,
    batch_rows: int,
    rate: float | None,
    fail_fast: bool,
    timeout: float,
    bootstrap: str | None,
    prefix: str | None,
) -> None:
    """Send records from SOURCE (a file, or - for stdin) to --topic, validated first.

    Formats: jsonl, avro (container file), csv, tsv (header row). Impression/Click go
    one per message keyed by request_id; Sample rows become SampleBatch messages.
    """
    schema = schema or TOPIC_SCHEMAS.get(topic)
    if schema is None:
        raise click.UsageError(f"--schema is required for topic {topic!r}")
    if schema != "Sample" and (slots or dense_dim is not None or key_slot):
        raise click.UsageError("--slots, --dense-dim and --key-slot apply to --schema Sample")
    try:
        fmt = fmt or detect_format(source)
    except SourceError as exc:
        raise click.UsageError(str(exc)) from None
    settings = load(KafkaSettings, bootstrap=bootstrap)
    physical = f"{load(TopicsSettings, prefix=prefix).prefix}{topic}"
    flat = fmt in ("csv", "tsv")
    with _seekable(source, schema == "Sample" and (not slots or dense_dim is None)) as path:
        run = _Run(path, fmt, rate, fail_fast, timeout)
        if schema == "Sample":
            config = _sample_layout(path, fmt, slots, dense_dim)
            if key_slot and key_slot not in config.slots:
                raise click.UsageError(f"--key-slot {key_slot!r} is not one of the slots")
            key = None if key_slot is None else _first_id_of(key_slot)
            samples = SampleProducer(settings, config, physical, batch_rows=batch_rows, key=key)
            tally = _pump(run, samples, partial(_send_sample, samples, flat))
            stats = samples.stats
        else:
            events = EventProducer(settings, impressions_topic=physical, clicks_topic=physical)
            send = events.impression if schema == "Impression" else events.click
            tally = _pump(run, events, (lambda r: send(coerce_flat(schema, r))) if flat else send)
            stats = events.stats
    undelivered = stats.rows - stats.delivered_rows
    click.echo(
        f"sent {stats.delivered_rows} of {tally.read} record(s) to {physical} "
        f"({stats.delivered} message(s), {stats.bytes:,} bytes); "
        f"{tally.invalid} invalid, {undelivered} undelivered"
    )
    if tally.invalid or undelivered:
        why = f"{tally.invalid + undelivered} of {tally.read} record(s) failed"
        if fail_fast and tally.first_bad_line is not None:
            why += f" (stopped at line {tally.first_bad_line}: --fail-fast)"
        click.echo(f"error: {why}", err=True)
        raise SystemExit(1)


@dataclass(frozen=True)
class _Run:
    path: str
    fmt: str
    rate: float | None
    fail_fast: bool
    timeout: float


def _pump(run: _Run, producer: EventProducer | SampleProducer, send: SendFn) -> _Tally:
    """Read, validate and send every record; report bad ones; always close the producer."""
    tally, pacer = _Tally(), _Pacer(run.rate)
    try:
        with _progress() as advance:
            for line in read_source(run.path, run.fmt):
                tally.read += 1
                try:
                    if line.record is None:
                        raise ValueError(line.error)
                    send(line.record)
                except (CodecError, ValueError) as exc:
                    _report(tally, line, str(exc))
                    if run.fail_fast:
                        break
                    continue
                pacer.wait()
                advance()
    finally:
        try:
            producer.close(run.timeout)
        except PipelineError as exc:  # counted as undelivered in the summary
            click.echo(f"error: {exc}", err=True)
    return tally


def _send_sample(samples: SampleProducer, flat: bool, record: dict[str, Any]) -> None:
    rec = sample_record(record, flat)
    features = {f["slot"]: [to_unsigned_int(i) for i in f["ids"]] for f in rec["features"]}
    weight = rec.get("weight", 1.0)
    samples.send(rec["label"], features, rec["event_time"], weight, rec.get("dense"))


@contextlib.contextmanager
def _seekable(source: str, needed: bool) -> Iterator[str]:
    """``source`` as a path that can be read twice (stdin is spooled to a temp file)."""
    if source != "-" or not needed:
        yield source
        return
    with tempfile.NamedTemporaryFile(prefix="pipeline-produce-", suffix=".stdin") as spool:
        shutil.copyfileobj(sys.stdin.buffer, spool)
        spool.flush()
        yield spool.name


def _sample_layout(path: str, fmt: str, slots: str | None, dense_dim: int | None) -> SlotConfig:
    names = [s.strip() for s in slots.split(",") if s.strip()] if slots else None
    if names is None or dense_dim is None:
        seen_slots, seen_dense = infer_layout(read_source(path, fmt), fmt in ("csv", "tsv"))
        names = names if names is not None else seen_slots
        dense_dim = dense_dim if dense_dim is not None else seen_dense
    try:
        return SlotConfig(tuple(names), dense_dim)
    except ValueError as exc:
        raise click.UsageError(f"--slots: {exc}") from None


def _report(tally: _Tally, line: SourceLine, error: str) -> None:
    tally.invalid += 1
    if tally.first_bad_line is None:
        tally.first_bad_line = line.line
    if tally.invalid <= MAX_REPORTED:
        click.echo(f"line {line.line}: {error}", err=True)
    elif tally.invalid == MAX_REPORTED + 1:
        click.echo(f"(more invalid lines; only the first {MAX_REPORTED} are shown)", err=True)


def _first_id_of(slot: str) -> KeyFn:
    """Key rows by the first id of ``slot`` (rows without it go unkeyed)."""

    def key(features: Any) -> int | None:
        ids = features.get(slot)
        return int(ids[0]) if ids else None

    return key


@contextlib.contextmanager
def _progress() -> Iterator[Any]:
    """A rich record counter on stderr when it is a terminal; a no-op otherwise."""
    if not click.get_text_stream("stderr").isatty():
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.completed:,} records"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("produce", total=None)
        yield lambda: bar.advance(task)
