"""``pipeline metrics show``: training metrics of a job, merged across its trainers."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any

import click

from pipeline.cli.options import redis_url_option
from pipeline.config import RedisSettings, load
from pipeline.errors import PipelineError
from pipeline.ps.frontclient import connect
from pipeline.train.metrics import SUMMARY_KEYS, MetricCounts
from pipeline.train.metrics_sink import RedisMetricsSink

__all__ = ["metrics", "show_report"]


@click.group()
def metrics() -> None:
    """Progressive-validation metrics that trainers publish to Redis."""


@metrics.command("show")
@click.option(
    "--job",
    envvar="PIPELINE_TRAIN_JOB",
    default="ctr",
    show_default=True,
    help="Training job name [env PIPELINE_TRAIN_JOB]",
)
@click.option(
    "--windows",
    "n_windows",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Also show the latest N windows, merged across trainers",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object (NaN as null)")
@redis_url_option
def show(job: str, n_windows: int, as_json: bool, redis_url: str | None) -> None:
    """Global metrics (all trainers' cumulative counts merged) and per-trainer rows."""
    settings = load(RedisSettings, url=redis_url)
    report = show_report(connect(settings), job, n_windows, settings.masked_url())
    if as_json:
        click.echo(json.dumps(report, sort_keys=False))
    else:
        click.echo(_text(report))


def show_report(client: Any, job: str, n_windows: int = 3, where: str = "redis") -> dict[str, Any]:
    """What ``metrics show`` prints, as a JSON-ready dict (NaN -> None)."""
    import redis

    try:
        sink = RedisMetricsSink(client, job)
        trainers = sink.per_trainer()
        windows = []
        for start in sink.windows(n_windows) if n_windows else []:
            counts, merged = sink.global_window(start)
            windows.append({"start_ms": start, "trainers": merged, **_summary(counts)})
    except redis.exceptions.RedisError as exc:
        raise PipelineError(f"cannot read metrics of job {job!r} from {where}: {exc}") from None
    except ValueError as exc:
        raise PipelineError(str(exc)) from None
    if not trainers:
        raise PipelineError(
            f"no metrics for job {job!r} in {where}: is a trainer of that job publishing there?"
        )
    total, _ = sink.merge(trainers)
    return {
        "job": job,
        "global": _summary(total),
        "trainers": {name: _summary(counts) for name, counts in trainers.items()},
        "windows": windows,
    }


def _summary(counts: MetricCounts) -> dict[str, Any]:
    out: dict[str, Any] = {k: (None if math.isnan(v) else v) for k, v in counts.summary().items()}
    out["samples"] = int(counts.count)
    out["max_event_time_ms"] = counts.max_event_time_ms
    return out


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _text(report: dict[str, Any]) -> str:
    glob = report["global"]
    lines = [f"job {report['job']}: {len(report['trainers'])} trainers, {glob['samples']:,} rows"]
    lines.append(
        "  " + "  ".join(f"{k} {_cell(glob[k], '.4f')}" for k in SUMMARY_KEYS if k != "samples")
    )
    header = f"{'trainer':24} {'rows':>14} {'auc':>7} {'logloss':>8} {'copc':>6}  last event (UTC)"
    lines += ["", header]
    for name, s in report["trainers"].items():
        lines.append(
            f"{name:24} {s['samples']:>14,} {_cell(s['auc'], '7.4f')} "
            f"{_cell(s['logloss'], '8.4f')} {_cell(s['copc'], '6.3f')}  "
            f"{_when(s['max_event_time_ms'])}"
        )
    if report["windows"]:
        lines += [
            "",
            f"{'window start (UTC)':20} {'trainers':>8} {'rows':>12} {'auc':>7} "
            f"{'logloss':>8} {'copc':>6}",
        ]
        for w in report["windows"]:
            lines.append(
                f"{_when(w['start_ms']):20} {len(w['trainers']):>8} {w['samples']:>12,} "
                f"{_cell(w['auc'], '7.4f')} {_cell(w['logloss'], '8.4f')} "
                f"{_cell(w['copc'], '6.3f')}"
            )
    return "\n".join(lines)
