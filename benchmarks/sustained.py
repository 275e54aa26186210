"""Sustained rate of the whole pipeline: a fixed offered rate, or the most it keeps up with.

Usage::

    flock "$HOME/.heavy.lock" python benchmarks/sustained.py --rate 2000 --duration 300
    flock "$HOME/.heavy.lock" python benchmarks/sustained.py --find-max [--start-rate 2000]
        [--probe-duration 120] [--duration 300]
    flock "$HOME/.heavy.lock" python benchmarks/sustained.py --rate 8000 --duration 150 --profile 30
    flock "$HOME/.heavy.lock" python benchmarks/sustained.py --feed-only --rate 20000 --duration 30

**A run** is ``pipeline demo`` itself (:func:`pipeline.demo.run_demo`: its own broker and
redis-server, the joiner, 2 shard servers, 2 DeepFM trainers, the snapshot coordinator,
the publisher and serve), fed by the synthetic generator at ``--rate`` impressions/s
(plus their clicks) for ``--duration`` seconds. From
its report (``<work>/<run>/report/report.json``, a tick every 2 s as in the demo) it
prints one table:

* offered events/s (impressions + clicks the feed produced, per second of its
  impressions) and achieved events/s (growth of the event topics' end offsets: what
  reached the broker), achieved samples/s (trained, global metrics);
* freshness p50/p99 over the measured window and over the whole data phase;
* each consumer group's lag (joiner on the event topics, trainers on ``samples``) at
  the end of the data, its max, and its mean over the middle and last third of the
  data phase in seconds of traffic (messages / the group's topics' message rate);
* each role's RSS when samples first flow and at the end of the data, its peak, and
  its mean CPU use in cores over that span (``/proc``, whole process groups; the
  stack's broker and redis, and ``feed``: this process, the producing thread);
* the global AUC of the last closed 10 s window against the generator's Bayes AUC.

The **measured window** is the last 180 s of the data, or the last 60% of a shorter
run (warm-up excluded).

**Pass rule** (the pipeline keeps up with the rate):

1. freshness p99 over the measured window <= attribution window + allowed lateness
   + 4 s (the join itself holds a sample that long; 5 + 1 + 4 = 10 s in the demo);
2. for the joiner and the trainers, lag is flat: its mean over the last third of the
   data phase is at most its mean over the middle third + 1 s of traffic, and its lag
   at the end of the data is at most 1 s of traffic plus the group's commit period
   (the joiner commits at its 2 s checkpoints, so 3 s; trainers 2 s);
3. the feed kept its pace (no event sent more than 1 s after its time);
4. every impression became a trained sample by the end of the demo's drain.

**--find-max** starts at ``--start-rate`` and multiplies the rate by ``--growth``
while probes pass (divides while they fail), then bisects between the highest pass
and the lowest failure until they are within ``--tolerance``; probes last
``--probe-duration`` s (pass rule on their last 60%; 120 s is also the demo's default
length). Then a confirmation run of ``--duration`` s at the rate found, and when it
fails another at 0.8x that (``--confirm-tries``): a longer run can fail where the
probe passed, because the embedded broker's CPU per request grows with the data it
holds (docs/demo.md, "Sustained rate"). A probe costs its duration plus about 40 s of
start, drain and stop.

**--profile S** records every role (and this process) with ``py-spy record`` for S
seconds in the middle of the run (``--nonblocking``, 50 Hz) and prints each one's
hottest frames. Profiling costs CPU on the same box: use it on a run of its own,
not on one whose pass/fail matters.

**--feed-only** measures the producing side alone against a private broker, in one
run: the demo's feed (blocks generated on the fly, Avro bodies from precomputed
pieces) against the record path it replaced (``TrafficGenerator.events`` dicts built
up front, then ``avro.encode`` + ``EventProducer`` per event), both paced at
``--rate``: CPU us per event of the producing thread and of the process.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, private_stack

from pipeline.demo import DemoError, DemoSettings, run_demo
from pipeline.demo.job import LATENESS_MS

FRESHNESS_SLACK_S = 4.0  # on top of the join's own delay (window + lateness)
LAG_FLAT_SLACK_S = 1.0  # last third vs middle third, seconds of traffic
LAG_END_S = {"join": 3.0, "train": 2.0}  # 1 s of traffic + the group's commit period
FEED_BEHIND_S = 1.0
WINDOW_S = 180.0  # the measured window of a full run
WINDOW_FRACTION = 0.6  # ... or this much of a shorter one
CONFIRM_STEP = 0.8  # a failed confirmation run is retried at this fraction of its rate


@dataclass
class Run:
    """One demo run at a rate and what the pass rule made of it."""

    rate: float
    duration_s: float
    state: Path
    wall_s: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and not self.failures


# -- one run ---------------------------------------------------------------------------


def _between(ticks: list[dict[str, Any]], lo: float, hi: float) -> list[dict[str, Any]]:
    return [t for t in ticks if lo <= t["t"] <= hi]


def _rate(ticks: list[dict[str, Any]], key: str) -> float | None:
    """Growth of ``key`` per second between the first and last tick that have it."""
    have = [t for t in ticks if t.get(key) is not None]
    if len(have) < 2 or have[-1]["t"] <= have[0]["t"]:
        return None
    return (have[-1][key] - have[0][key]) / (have[-1]["t"] - have[0]["t"])


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def analyse(
    report: dict[str, Any], rate: float, window_s: float
) -> tuple[dict[str, Any], list[str]]:
    """The figures of one run and the pass rule's failures (empty: it kept up)."""
    summary, ticks = report["summary"], report["timeline"]
    settings = report["settings"]
    end = float(summary["data_end_s"])
    measured = _between(ticks, end - window_s, end)
    data = _between(ticks, 0.0, end)
    fresh = [t["freshness_s"] for t in measured if t["freshness_s"] is not None]
    fresh_all = [t["freshness_s"] for t in data if t["freshness_s"] is not None]
    events = summary.get("events") or {}
    imps, clicks = events.get("impressions", 0), events.get("clicks", 0)
    figures: dict[str, Any] = {
        "offered_impressions_s": rate,
        "offered_events_s": rate * (imps + clicks) / imps if imps else None,
        "achieved_events_s": _rate(measured, "events_end"),
        "achieved_samples_s": _rate(measured, "trained"),
        "freshness_p50_s": _pct(fresh, 50),
        "freshness_p99_s": _pct(fresh, 99),
        "freshness_p50_all_s": _pct(fresh_all, 50),
        "freshness_p99_all_s": _pct(fresh_all, 99),
        "auc_last_window": summary.get("last_window_auc"),
        "bayes_auc": summary.get("bayes_auc"),
        "auc_cumulative": summary.get("final_auc"),
        "samples_expected": summary.get("samples_expected"),
        "rows_trained": summary.get("rows_trained"),
        "feed": summary.get("feed") or {},
        "resources": summary.get("resources") or {},
        "window_s": window_s,
        "data_end_s": end,
    }
    failures: list[str] = []
    join_delay_s = (settings.get("attribution_window_s") or 0.0) + LATENESS_MS / 1000
    bound = join_delay_s + FRESHNESS_SLACK_S
    p99 = figures["freshness_p99_s"]
    if p99 is None or p99 > bound:
        failures.append(f"freshness p99 {p99 if p99 is None else round(p99, 1)} s > {bound:g} s")
    lags: dict[str, dict[str, Any]] = {}
    thirds = (end / 3, 2 * end / 3)
    for group, lag_key, end_key in (
        ("join", "join_lag", "events_end"),
        ("train", "lag", "samples_end"),
    ):
        per_s = _rate(data[len(data) // 3 :], end_key)  # the topics' messages per second
        series = [(t["t"], t[lag_key]) for t in data if t[lag_key] is not None]
        if not series or not per_s:
            failures.append(f"{group}: no lag measured")
            continue
        middle = [v for t, v in series if thirds[0] <= t < thirds[1]]
        last = [v for t, v in series if t >= thirds[1]]
        info = {
            "end": series[-1][1],
            "max": max(v for _, v in series),
            "messages_s": per_s,
            "end_s": series[-1][1] / per_s,
            "middle_s": float(np.mean(middle)) / per_s if middle else None,
            "last_s": float(np.mean(last)) / per_s if last else None,
        }
        lags[group] = info
        middle_s, last_s = info["middle_s"], info["last_s"]
        if middle_s is not None and last_s is not None and last_s > middle_s + LAG_FLAT_SLACK_S:
            failures.append(
                f"{group} lag grows: {middle_s:.1f} s -> {last_s:.1f} s "
                "of traffic (middle -> last third)"
            )
        if info["end_s"] > LAG_END_S[group]:
            failures.append(
                f"{group} lag at the end {info['end_s']:.1f} s of traffic > {LAG_END_S[group]:g} s"
            )
    figures["lags"] = lags
    figures["cpu_thirds"] = _cpu_thirds(report.get("usage") or [], end)
    behind = figures["feed"].get("behind_s_max")
    if behind is not None and behind > FEED_BEHIND_S:
        failures.append(f"the feed fell {behind:.1f} s behind its pace")
    if summary.get("rows_trained") != summary.get("samples_expected"):
        failures.append(
            f"{summary.get('rows_trained')} of {summary.get('samples_expected')} samples trained"
        )
    return figures, failures


def _cpu_thirds(usage: list[dict[str, Any]], end: float) -> dict[str, tuple[float, float]]:
    """Each role's mean CPU (cores) over the middle and the last third of the data phase:
    a role whose cost per event grows over the run shows it here."""
    marks = [end / 3, 2 * end / 3, end]
    at = [next((u for u in usage if u["t"] >= m), None) for m in marks[:2]]
    at.append(next((u for u in reversed(usage) if u["t"] <= end), None))
    if any(u is None for u in at):
        return {}
    a, b, c = at
    assert a is not None and b is not None and c is not None
    out = {}
    for role in (k for k in c if k != "t" and k in a and k in b):
        middle = (b[role]["cpu_s"] - a[role]["cpu_s"]) / max(1e-9, b["t"] - a["t"])
        last = (c[role]["cpu_s"] - b[role]["cpu_s"]) / max(1e-9, c["t"] - b["t"])
        out[role] = (round(middle, 2), round(last, 2))
    return out


def measure(
    rate: float,
    duration_s: float,
    work: Path,
    *,
    window_s: float | None = None,
    profile_s: float = 0.0,
    seed: int = 0,
) -> Run:
    """One demo run at ``rate`` for ``duration_s``; its figures and pass/fail."""
    state = work / f"rate{rate:g}-{duration_s:g}s-{int(time.time())}"
    state.mkdir(parents=True)
    run = Run(rate, duration_s, state)
    log = open(state / "demo.out", "w")  # noqa: SIM115 - closed below
    last_print = [0.0]

    def echo(line: str) -> None:
        log.write(line + "\n")
        log.flush()
        if line.startswith("[") and time.monotonic() - last_print[0] >= 30:
            last_print[0] = time.monotonic()
            print(f"  {line}", flush=True)

    settings = DemoSettings(state_dir=state, duration_s=duration_s, rate=rate, seed=seed)
    profiler = None
    if profile_s > 0:
        profiler = threading.Thread(
            target=_profile, args=(state, duration_s / 2, profile_s), daemon=True
        )
        profiler.start()
    print(f"\nrun at {rate:g} impressions/s for {duration_s:g} s (state {state})", flush=True)
    t0 = time.monotonic()
    try:
        run.summary = run_demo(settings, echo=echo)
    except DemoError as exc:
        run.error = str(exc)
    finally:
        run.wall_s = time.monotonic() - t0
        log.close()
    if profiler is not None:
        profiler.join(profile_s + 60)
    if run.error is None:
        report = json.loads((state / "report" / "report.json").read_text())
        window = window_s if window_s is not None else _window(duration_s)
        run.figures, run.failures = analyse(report, rate, window)
    (state / "sustained.json").write_text(
        json.dumps(
            {
                "rate": rate,
                "duration_s": duration_s,
                "wall_s": run.wall_s,
                "passed": run.passed,
                "failures": run.failures,
                "error": run.error,
                "figures": run.figures,
            },
            indent=2,
            default=str,
        )
    )
    return run


def _window(duration_s: float) -> float:
    return min(WINDOW_S, WINDOW_FRACTION * duration_s)


def _f(value: Any, fmt: str = "{:,.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def print_run(run: Run) -> None:
    """The table of one run."""
    verdict = "PASS" if run.passed else "FAIL"
    title = f"{run.rate:g} impressions/s for {run.duration_s:g} s: {verdict}"
    if run.error:
        print_table(title, ["", ""], [["error", run.error], ["wall", f"{run.wall_s:.0f} s"]])
        return
    f = run.figures
    window = f"last {f['window_s']:g} s"
    rows: list[list[Any]] = [
        [
            "offered events/s",
            f"{_f(f['offered_events_s'])} ({_f(f['offered_impressions_s'])} impressions/s)",
        ],
        ["achieved events/s", _f(f["achieved_events_s"])],
        ["achieved samples/s", _f(f["achieved_samples_s"])],
        [
            f"freshness p50 / p99 ({window})",
            f"{_f(f['freshness_p50_s'], '{:.1f}')} / {_f(f['freshness_p99_s'], '{:.1f}')} s",
        ],
        [
            "freshness p50 / p99 (whole run)",
            f"{_f(f['freshness_p50_all_s'], '{:.1f}')} / "
            f"{_f(f['freshness_p99_all_s'], '{:.1f}')} s",
        ],
    ]
    for group, lag in f["lags"].items():
        rows.append(
            [
                f"{group} lag at end / max (msgs)",
                f"{lag['end']:,} / {lag['max']:,}  ({lag['end_s']:.1f} s of traffic; "
                f"mean middle {_f(lag['middle_s'], '{:.1f}')} s, "
                f"last third {_f(lag['last_s'], '{:.1f}')} s)",
            ]
        )
    rows += [
        [
            "AUC last window (Bayes)",
            f"{_f(f['auc_last_window'], '{:.4f}')} ({_f(f['bayes_auc'], '{:.4f}')}); "
            f"cumulative {_f(f['auc_cumulative'], '{:.4f}')}",
        ],
        ["samples trained / expected", f"{_f(f['rows_trained'])} / {_f(f['samples_expected'])}"],
        [
            "feed: behind max, CPU/event",
            f"{_f(f['feed'].get('behind_s_max'), '{:.3f}')} s, "
            f"{_f(f['feed'].get('cpu_us_per_event'), '{:.1f}')} us (producing thread)",
        ],
        ["wall time of the run", f"{run.wall_s:.0f} s"],
    ]
    if run.failures:
        rows.append(["failed", "; ".join(run.failures)])
    print_table(title, ["metric", "value"], rows)
    roles = f["resources"]
    if roles:
        print_table(
            "  per role (from when samples flow to the end of the data)",
            ["role", "RSS start MB", "RSS end MB", "RSS peak MB", "CPU cores", "middle / last 3rd"],
            [
                [
                    r,
                    v["rss_start_mb"],
                    v["rss_end_mb"],
                    v["rss_peak_mb"],
                    f"{v['cpu_cores']:.2f}",
                    "{:.2f} / {:.2f}".format(*f["cpu_thirds"].get(r, (math.nan, math.nan))),
                ]
                for r, v in sorted(roles.items())
            ],
        )


# -- profile ---------------------------------------------------------------------------


def _profile(state: Path, after_s: float, seconds: float) -> None:
    """py-spy every role (and this process) for ``seconds``, ``after_s`` into the run."""
    pids_file = state / "logs" / "demo-pids.json"
    deadline = time.monotonic() + after_s
    while time.monotonic() < deadline or not pids_file.exists():
        time.sleep(1.0)
    pids = {k: v for k, v in json.loads(pids_file.read_text()).items() if k != "snapshot-final"}
    pids["feed"] = os.getpid()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = state / "profile"
    out.mkdir(exist_ok=True)
    procs = {
        role: subprocess.Popen(
            [
                spy,
                "record",
                "--nonblocking",
                "-r",
                "50",
                "-d",
                str(int(seconds)),
                "-f",
                "raw",
                "-o",
                str(out / f"{role}.txt"),
                "-p",
                str(pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for role, pid in pids.items()
    }
    for proc in procs.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(seconds + 30)
    lines = [f"\npy-spy, {seconds:g} s from {after_s:g} s into the run (% of samples; 50 Hz)"]
    for role in procs:
        path = out / f"{role}.txt"
        if not path.exists():
            lines.append(f"  {role}: no profile (py-spy failed)")
            continue
        lines += _hottest(role, path, seconds)
    text = "\n".join(lines)
    (out / "summary.txt").write_text(text)
    print(text, flush=True)


def _hottest(role: str, path: Path, seconds: float, top: int = 8) -> list[str]:
    """The busiest frames (self time) and the share of wall time the role was busy."""
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] += int(count)
    busy = total / (50 * seconds)  # active samples per thread-second of wall time
    out = [f"  {role}: {total} samples ({busy:.2f} threads busy on average)"]
    for frame, n in own.most_common(top):
        out.append(f"    {n / max(total, 1):6.1%}  {frame[:110]}")
    return out


# -- find the max ----------------------------------------------------------------------


def _round_rate(rate: float) -> float:
    """Two significant digits in steps of 5 (8437 -> 8500, 1234 -> 1250)."""
    step = 5 * 10 ** max(0, math.floor(math.log10(rate)) - 2)
    return float(max(step, round(rate / step) * step))


def find_max(args: argparse.Namespace, work: Path) -> list[Run]:
    runs: list[Run] = []

    def probe(rate: float) -> bool:
        run = measure(rate, args.probe_duration, work, seed=args.seed)
        runs.append(run)
        print_run(run)
        return run.passed

    lo: float | None = None
    hi: float | None = None
    rate = args.start_rate
    while True:
        if probe(rate):
            lo = rate
            if hi is not None or rate >= args.max_rate:
                break
            rate = min(args.max_rate, _round_rate(rate * args.growth))
        else:
            hi = rate
            if lo is not None:
                break
            rate = _round_rate(rate / args.growth)
            if rate < args.min_rate:
                break
    while lo is not None and hi is not None and hi / lo > 1 + args.tolerance:
        mid = _round_rate(math.sqrt(lo * hi))
        if mid in (lo, hi):
            break
        if probe(mid):
            lo = mid
        else:
            hi = mid
    if lo is None:
        print(f"\nno probe passed down to {args.min_rate:g} impressions/s")
        return runs
    print(f"\nhighest passing probe {lo:g} impressions/s (lowest failing {hi}); confirming")
    rate = lo
    for _ in range(max(1, args.confirm_tries)):
        confirm = measure(rate, args.duration, work, seed=args.seed)
        runs.append(confirm)
        print_run(confirm)
        if confirm.passed:
            break
        rate = _round_rate(rate * CONFIRM_STEP)  # longer runs can fail where probes passed
    return runs


def print_search(runs: list[Run]) -> None:
    rows = []
    for r in runs:
        f = r.figures
        lags = f.get("lags", {})
        rows.append(
            [
                f"{r.rate:g}",
                f"{r.duration_s:g}",
                _f(f.get("offered_events_s")),
                _f(f.get("achieved_events_s")),
                _f(f.get("achieved_samples_s")),
                f"{_f(f.get('freshness_p50_s'), '{:.1f}')} / "
                f"{_f(f.get('freshness_p99_s'), '{:.1f}')}",
                f"{_f(f.get('freshness_p50_all_s'), '{:.1f}')} / "
                f"{_f(f.get('freshness_p99_all_s'), '{:.1f}')}",
                " ".join(f"{g} {v['end_s']:.1f}" for g, v in lags.items()) or "-",
                "PASS" if r.passed else "FAIL",
                r.error or "; ".join(r.failures) or "",
            ]
        )
    print_table(
        "runs (rate = offered impressions/s; lag at end in seconds of traffic)",
        [
            "rate",
            "s",
            "offered ev/s",
            "achieved ev/s",
            "samples/s",
            "fresh p50/p99 (window)",
            "fresh p50/p99 (all)",
            "lag end",
            "verdict",
            "why",
        ],
        rows,
    )


# -- the producing side alone ----------------------------------------------------------


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _record_feed(bootstrap: str, topics: tuple[str, str], gen: Any, n: int) -> dict[str, float]:
    """The replaced path: every record built first, then avro.encode + EventProducer per
    event, at wall-clock pace (in a thread, as the feed)."""
    from pipeline.config import KafkaSettings
    from pipeline.ingest.producer import EventProducer

    out: dict[str, float] = {}

    def work() -> None:
        cpu0 = time.thread_time()
        log = gen.events(n)
        out["build_s"] = time.thread_time() - cpu0
        plan = heapq.merge(
            ((r["event_time"], 0, r) for r in log.impressions),
            ((r["event_time"], 1, r) for r in log.clicks),
            key=lambda e: (e[0], e[1]),
        )
        shift = max(0, int(time.time() * 1000) - gen.config.start_time_ms)
        behind = 0.0
        with EventProducer(KafkaSettings(bootstrap=bootstrap), *topics) as producer:
            for event_time, kind, record in plan:
                event_time += shift
                wait = event_time / 1000 - time.time()
                if wait > 0.01:
                    time.sleep(wait)
                behind = max(behind, -wait)
                record = {**record, "event_time": event_time}
                (producer.impression if kind == 0 else producer.click)(record)
        out["events"] = len(log.impressions) + len(log.clicks)
        out["cpu_s"] = time.thread_time() - cpu0
        out["behind_s"] = behind

    cpu0 = _cpu()
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    out["process_cpu_s"] = _cpu() - cpu0
    return out


def feed_only(args: argparse.Namespace) -> None:
    from pipeline.demo.feeds import EventFeed
    from pipeline.ingest.generator import TrafficGenerator
    from pipeline.topics import apply_topics, load_topic_specs

    n = int(args.rate * args.duration)
    rows: list[list[Any]] = []
    with private_stack(prefix="sustained-feed-") as (stack, _work):
        bootstrap = stack.bootstrap
        specs = [s for s in load_topic_specs() if s.name.startswith("events.")]
        for name in ("records", "blocks"):
            prefix = f"{name}."
            apply_topics({"bootstrap.servers": bootstrap, "log_level": 0}, specs, prefix=prefix)
            topics = (f"{prefix}events.impressions", f"{prefix}events.clicks")
            gen = TrafficGenerator(
                seed=args.seed,
                rate=args.rate,
                start_time_ms=int(time.time() * 1000),
                attribution_window_ms=5000,
                mean_click_delay_ms=1000,
            )
            print(f"{name}: {n} impressions at {args.rate:g}/s", flush=True)
            if name == "records":
                got = _record_feed(bootstrap, topics, gen, n)
                events, cpu, proc = got["events"], got["cpu_s"], got["process_cpu_s"]
                behind, build = got["behind_s"], got["build_s"]
            else:
                cpu0 = _cpu()
                feed = EventFeed(bootstrap, *topics, gen, n)
                feed.start()
                feed.join()
                if feed.error:
                    raise SystemExit(f"error: {feed.error}")
                proc = _cpu() - cpu0
                events, cpu, behind = feed.impressions + feed.clicks, feed.cpu_s, feed.behind_s
                build = 0.0
            rows.append(
                [
                    name,
                    events,
                    cpu / events * 1e6,
                    proc / events * 1e6,
                    build / events * 1e6,
                    behind,
                ]
            )
    base = float(rows[0][2])
    for row in rows:
        row.append(f"{base / float(row[2]):.1f}x")
    print_table(
        f"producing side at {args.rate:g} impressions/s ({args.duration:g} s of traffic)",
        [
            "path",
            "events",
            "thread CPU us/event",
            "process CPU us/event",
            "of which building records",
            "behind max s",
            "thread speed-up",
        ],
        rows,
    )


# -- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="offered impressions/s")
    parser.add_argument("--duration", type=float, default=None, help="seconds (default 300)")
    parser.add_argument("--find-max", action="store_true")
    parser.add_argument("--start-rate", type=float, default=2000.0)
    parser.add_argument("--probe-duration", type=float, default=120.0)
    parser.add_argument("--growth", type=float, default=1.5)
    parser.add_argument("--tolerance", type=float, default=0.1, help="bisect to this ratio")
    parser.add_argument(
        "--confirm-tries",
        type=int,
        default=2,
        help="confirmation runs, each at 0.8x the last when it failed",
    )
    parser.add_argument("--min-rate", type=float, default=250.0)
    parser.add_argument("--max-rate", type=float, default=60_000.0)
    parser.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="S",
        help="py-spy every role for S seconds mid-run",
    )
    parser.add_argument("--feed-only", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="where run states go (kept)")
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 30.0 if args.feed_only else 300.0
    if args.feed_only:
        feed_only(args)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="sustained-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"run states in {work}", flush=True)
    started = time.monotonic()
    if args.find_max:
        runs = find_max(args, work)
        print_search(runs)
    else:
        run = measure(args.rate, args.duration, work, profile_s=args.profile, seed=args.seed)
        print_run(run)
    print(f"\ntotal wall time {(time.monotonic() - started) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
