"""The demo's numbers over time, its summary, and the report dir (report.json + PNGs).

A :class:`Timeline` collects one :class:`Tick` per progress line; :func:`summarize`
turns it into the final figures (rows trained, AUC against the generator's Bayes
AUC and the 0.5 of a constant prediction, throughput, freshness percentiles) and
:func:`write_report` writes them with PNG plots of AUC, throughput, freshness and
consumer lag.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.demo.procs import Usage

__all__ = [
    "Tick",
    "Timeline",
    "format_tick",
    "group_lags",
    "resources",
    "summarize",
    "write_report",
]

BASELINE_AUC = 0.5  # any constant prediction (e.g. the running CTR) ranks nothing


@dataclass(frozen=True)
class Tick:
    """One progress sample: seconds since start and what the system reported."""

    t: float
    produced: int
    trained: int
    samples_per_s: float
    auc: float | None
    model_version: int | None
    freshness_s: float | None
    lag: int | None = None  # messages the trainer group has not committed
    join_lag: int | None = None  # event messages the joiner has not committed
    window_auc: float | None = None  # global AUC of the last closed metrics window
    samples_end: int | None = None  # end offsets of ``samples`` (messages written so far)
    events_end: int | None = None  # end offsets of the event topics (events the broker has)


@dataclass
class Timeline:
    """Ticks in order, plus facts known once (Bayes AUC, versions, snapshots)."""

    ticks: list[Tick] = field(default_factory=list)
    # per tick: {"t": seconds, role: {"rss_mb": resident MB, "cpu_s": CPU seconds so far}}
    usage: list[dict[str, Any]] = field(default_factory=list)

    def add(self, tick: Tick) -> None:
        self.ticks.append(tick)

    def add_usage(self, t: float, usage: Mapping[str, Usage]) -> None:
        """Resource use of every role at ``t`` (values with ``rss_mb`` and ``cpu_s``)."""
        self.usage.append(
            {
                "t": t,
                **{n: {"rss_mb": u.rss_mb, "cpu_s": round(u.cpu_s, 2)} for n, u in usage.items()},
            }
        )


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def format_tick(tick: Tick) -> str:
    """One terminal progress line."""
    auc = f"{tick.auc:.4f}" if tick.auc is not None else "  -   "
    if tick.window_auc is not None:
        auc += f" (window {tick.window_auc:.3f})"
    version = str(tick.model_version) if tick.model_version is not None else "-"
    fresh = f"{tick.freshness_s:.1f}s" if tick.freshness_s is not None else "-"
    lag = "-" if tick.lag is None else str(tick.lag)
    if tick.join_lag is not None:
        lag += f" (join {tick.join_lag})"
    return (
        f"[{tick.t:6.1f}s] produced {tick.produced:>8} trained {tick.trained:>8} "
        f"({tick.samples_per_s:5.0f}/s) lag {lag} msgs  AUC {auc}  "
        f"model v{version} freshness {fresh}"
    )


def summarize(
    timeline: Timeline,
    *,
    trained: int,
    auc: float | None,
    bayes_auc: float | None,
    elapsed_s: float,
    train_s: float,
    versions: int | None,
    snapshot: str | None,
) -> dict[str, Any]:
    """The final figures (JSON-ready; None where unknown)."""
    fresh = [t.freshness_s for t in timeline.ticks if t.freshness_s is not None]
    rates = [t.samples_per_s for t in timeline.ticks if t.samples_per_s > 0]
    lags = [t.lag for t in timeline.ticks if t.lag is not None]
    windows = [t.window_auc for t in timeline.ticks if t.window_auc is not None]
    return {
        "rows_trained": trained,
        "final_auc": _finite(auc),
        "last_window_auc": _finite(windows[-1]) if windows else None,
        "bayes_auc": _finite(bayes_auc),
        "baseline_auc": BASELINE_AUC,
        "elapsed_s": round(elapsed_s, 2),
        "throughput_mean": round(trained / train_s, 1) if train_s > 0 else None,
        "throughput_peak": round(max(rates), 1) if rates else None,
        "freshness_p50_s": float(np.percentile(fresh, 50)) if fresh else None,
        "freshness_p99_s": float(np.percentile(fresh, 99)) if fresh else None,
        "versions_published": versions,
        "last_snapshot": snapshot,
        "lag_max_messages": max(lags) if lags else None,
        "lag_final_messages": lags[-1] if lags else None,
    }


def resources(timeline: Timeline, start_t: float, end_t: float) -> dict[str, Any]:
    """Each role's RSS (MB) at ``start_t`` and ``end_t`` (the nearest samples at or after
    and at or before), its peak, and its mean CPU use (cores) between the two."""
    samples = timeline.usage
    first = next((u for u in samples if u["t"] >= start_t), None)
    last = next((u for u in reversed(samples) if u["t"] <= end_t), None)
    if first is None or last is None or last["t"] <= first["t"]:
        return {}
    span = last["t"] - first["t"]
    out: dict[str, Any] = {}
    for role in (k for k in last if k != "t"):
        if role not in first:
            continue
        peak = max(u[role]["rss_mb"] for u in samples if role in u)
        out[role] = {
            "rss_start_mb": first[role]["rss_mb"],
            "rss_end_mb": last[role]["rss_mb"],
            "rss_peak_mb": peak,
            "cpu_cores": round((last[role]["cpu_s"] - first[role]["cpu_s"]) / span, 3),
        }
    return out


def group_lags(timeline: Timeline, end_t: float) -> dict[str, dict[str, int | None]]:
    """Each consumer group's lag (messages) at the last tick up to ``end_t`` and its max."""
    ticks = [t for t in timeline.ticks if t.t <= end_t]
    out: dict[str, dict[str, int | None]] = {}
    for group, get in (("train", lambda t: t.lag), ("join", lambda t: t.join_lag)):
        values = [get(t) for t in ticks if get(t) is not None]
        if values:
            out[group] = {"end": values[-1], "max": max(values)}
    return out


def summary_text(summary: dict[str, Any]) -> str:
    """The summary as a few human lines."""

    def num(key: str, fmt: str = "{:.4f}") -> str:
        value = summary.get(key)
        return "-" if value is None else fmt.format(value)

    return "\n".join(
        [
            f"rows trained      {summary['rows_trained']}",
            f"global AUC        {num('final_auc')}  (Bayes {num('bayes_auc')}, "
            f"constant baseline {summary['baseline_auc']:.1f}); "
            f"last window {num('last_window_auc')}",
            f"throughput        {num('throughput_mean', '{:.0f}')} samples/s mean, "
            f"{num('throughput_peak', '{:.0f}')} peak",
            f"freshness         p50 {num('freshness_p50_s', '{:.1f}')} s, "
            f"p99 {num('freshness_p99_s', '{:.1f}')} s",
            f"versions          {num('versions_published', '{}')} published",
            f"last snapshot     {summary['last_snapshot'] or '-'}",
            *_joiner_lines(summary),
            *_resource_lines(summary),
        ]
    )


def _resource_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    lags = summary.get("lags") or {}
    if lags:
        text = ", ".join(f"{g} {v['end']} (max {v['max']})" for g, v in lags.items())
        lines.append(f"lag at data end   {text} messages")
    roles = summary.get("resources") or {}
    if roles:
        rss = ", ".join(
            f"{r} {v['rss_start_mb']:.0f}->{v['rss_end_mb']:.0f}" for r, v in roles.items()
        )
        lines.append(f"RSS MB start->end {rss}")
        cpu = ", ".join(f"{r} {v['cpu_cores']:.2f}" for r, v in roles.items())
        lines.append(f"CPU cores         {cpu}")
    return lines


def _joiner_lines(summary: dict[str, Any]) -> list[str]:
    events, counters = summary.get("events"), summary.get("joiner")
    if not events:
        return []
    line = f"events            {events['impressions']} impressions, {events['clicks']} clicks"
    if counters:
        line += (
            f"; joined {counters['positives']} positives + {counters['negatives']} negatives, "
            f"{counters['late_clicks']} late clicks, {counters['orphan_clicks']} orphans"
        )
    return [line]


def _plot(path: Path, xs: list[float], series: dict[str, list[float | None]], ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    try:
        for label, ys in series.items():
            pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
        ax.set_xlabel("seconds since start")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(loc="best")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def write_report(
    directory: Path, timeline: Timeline, summary: dict[str, Any], meta: dict[str, Any]
) -> list[Path]:
    """Write report.json and auc.png, throughput.png, freshness.png, lag.png; returns paths.

    The PNGs need matplotlib (a project dependency); without it only report.json is written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ticks = timeline.ticks
    report = {
        "summary": summary,
        "settings": meta,
        "timeline": [
            {k: (_finite(v) if isinstance(v, float) else v) for k, v in asdict(t).items()}
            for t in ticks
        ],
        "usage": timeline.usage,
    }
    out = directory / "report.json"
    out.write_text(json.dumps(report, indent=2))
    xs = [t.t for t in ticks]
    bayes = summary.get("bayes_auc")
    auc_series: dict[str, list[float | None]] = {
        "global AUC (cumulative)": [t.auc for t in ticks],
        "global AUC (last window)": [t.window_auc for t in ticks],
    }
    if bayes is not None:
        auc_series["Bayes AUC"] = [bayes] * len(ticks)
    auc_series["constant baseline"] = [BASELINE_AUC] * len(ticks)
    plots: dict[str, tuple[dict[str, list[float | None]], str]] = {
        "auc.png": (auc_series, "AUC (progressive)"),
        "throughput.png": (
            {"trained samples/s": [float(t.samples_per_s) for t in ticks]},
            "samples/s",
        ),
        "freshness.png": ({"freshness": [t.freshness_s for t in ticks]}, "freshness (s)"),
        "lag.png": (
            {
                "trainers": [None if t.lag is None else float(t.lag) for t in ticks],
                "joiner": [None if t.join_lag is None else float(t.join_lag) for t in ticks],
            },
            "consumer lag (messages)",
        ),
    }
    paths = [out]
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # report.json still has every number
        return paths
    for name, (series, ylabel) in plots.items():
        _plot(directory / name, xs, series, ylabel)
        paths.append(directory / name)
    return paths
