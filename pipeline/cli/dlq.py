"""``pipeline dlq inspect|replay``: look at dead letters and re-submit them."""

from __future__ import annotations

import json
import runpy
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from pipeline.cli.options import bootstrap_option, prefix_option
from pipeline.config import KafkaSettings, TopicsSettings, load
from pipeline.errors import PipelineError
from pipeline.ingest.dlq import TRUNCATED, FixFn, read_dead_letters, replay_dead_letters

__all__ = ["dlq", "load_fix"]

F = TypeVar("F", bound=Callable[..., Any])


def _topic(prefix: str | None, name: str) -> str:
    return f"{load(TopicsSettings, prefix=prefix).prefix}{name}"


def _topic_option(func: F) -> F:
    return click.option(
        "--topic",
        default="samples.dlq",
        show_default=True,
        help="Dead-letter topic (logical name; --prefix is prepended)",
    )(func)


def _reason_option(func: F) -> F:
    return click.option(
        "--reason",
        "reasons",
        multiple=True,
        metavar="CODE",
        help="Only dead letters with this reason (repeatable), e.g. avro_decode",
    )(func)


@click.group()
def dlq() -> None:
    """Dead letters (samples.dlq): inspect them, replay them to their source topic."""


@dlq.command("inspect")
@bootstrap_option
@prefix_option
@_topic_option
@_reason_option
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Show at most N")
@click.option("--from-offset", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (base64 bytes)")
def inspect_cmd(
    bootstrap: str | None,
    prefix: str | None,
    topic: str,
    reasons: tuple[str, ...],
    limit: int | None,
    from_offset: int,
    as_json: bool,
) -> None:
    """List dead letters: offset, source topic/partition/offset, reason, error, size."""
    settings = load(KafkaSettings, bootstrap=bootstrap)
    name = _topic(prefix, topic)
    counts: Counter[str] = Counter()
    letters = read_dead_letters(
        settings, name, reasons=reasons or None, limit=limit, from_offset=from_offset
    )
    for letter in letters:
        if not counts and not as_json:  # header only once the topic could be read
            click.echo(f"{'offset':>8}  {'source':40}  {'reason':22}  {'size':>8}  error")
        counts[letter.reason] += 1
        if as_json:
            click.echo(json.dumps(letter.to_json(), sort_keys=True))
            continue
        where = f"{letter.partition}:{letter.offset}"
        source = f"{letter.source_topic}[{letter.source_partition}]@{letter.source_offset}"
        error = letter.error.replace("\n", " ")
        if letter.truncated:
            error = f"[truncated: first {len(letter.value):,} bytes kept] {error}"
        click.echo(f"{where:>8}  {source:40}  {letter.reason:22}  {letter.size:>8}  {error}")
    by_reason = ", ".join(f"{r}={n}" for r, n in sorted(counts.items())) or "none"
    click.echo(f"{sum(counts.values())} dead letter(s) in {name} ({by_reason})", err=True)


def load_fix(path: str) -> FixFn:
    """``fix(letter) -> bytes | None`` from a Python file (a repair step for replay)."""
    namespace = runpy.run_path(str(Path(path)))
    fix = namespace.get("fix")
    if not callable(fix):
        raise PipelineError(f"{path} must define fix(letter) -> bytes | None")

    def checked(letter: object) -> bytes | None:
        out = fix(letter)
        if out is not None and not isinstance(out, bytes):
            raise PipelineError(f"{path}: fix() returned {type(out).__name__}, not bytes/None")
        return out

    return checked


@dlq.command("replay")
@bootstrap_option
@prefix_option
@_topic_option
@_reason_option
@click.option(
    "--to",
    "to",
    default=None,
    metavar="TOPIC",
    help="Send here (logical name; --prefix is prepended) instead of each source topic",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Replay at most N")
@click.option("--from-offset", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--fix-script",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Python file defining fix(letter) -> bytes | None, applied before re-sending",
)
def replay_cmd(
    bootstrap: str | None,
    prefix: str | None,
    topic: str,
    reasons: tuple[str, ...],
    to: str | None,
    limit: int | None,
    from_offset: int,
    fix_script: str | None,
) -> None:
    """Re-submit the original bytes and keys of dead letters; prints counts.

    Truncated dead letters (too large to keep whole) are refused: exit code 1.
    """
    settings = load(KafkaSettings, bootstrap=bootstrap)
    summary = replay_dead_letters(
        settings,
        _topic(prefix, topic),
        to=_topic(prefix, to) if to else None,
        reasons=reasons or None,
        limit=limit,
        from_offset=from_offset,
        fix=load_fix(fix_script) if fix_script else None,
    )
    for target, n in sorted(summary.replayed.items()):
        click.echo(f"replayed {n} to {target}")
    for reason, n in sorted(summary.by_reason.items()):
        click.echo(f"  reason {reason}: {n}")
    for why, n in sorted(summary.skipped.items()):
        click.echo(f"skipped {n} ({why})")
    click.echo(f"{summary.total} replayed, {summary.failed} failed", err=True)
    refused = summary.skipped.get(TRUNCATED, 0)
    if refused:
        click.echo(
            f"error: {refused} dead letter(s) not replayed: the message was too large to "
            "dead-letter whole and only its first bytes were kept (see dlq inspect)",
            err=True,
        )
    if summary.failed:
        click.echo(f"error: {summary.failed} replayed message(s) were not delivered", err=True)
    if summary.failed or refused:
        raise SystemExit(1)
