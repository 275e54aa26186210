"""Orchestration of ``pipeline demo``: stack, data, PS, trainers, snapshots, publish, serve.

The demo runs every role as a subprocess (:class:`~pipeline.demo.procs.ProcessSet`)
against a broker + Redis it starts on free ports (or external ones), prints a
progress line every ``progress_s`` seconds from the global metrics in Redis and
the serving ``/health``, and stops in order at ``duration_s`` or on Ctrl-C:
data, trainers (drained, then SIGTERM: push, apply, commit), a last snapshot,
then publisher, server, shard servers and the stack. Any failure stops every
process group it started before the error is raised.

Data (:mod:`pipeline.demo.feeds`): by default the synthetic
:class:`~pipeline.ingest.generator.TrafficGenerator`'s impressions and clicks,
produced at wall-clock pace to the event topics and joined into samples by a
``pipeline join`` process; or (``source="samples"``) its labelled sample batches
straight to ``samples``; or a dataset's batches paced at ``rate`` rows/s with event
times restamped to the wall clock.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from pipeline.codec.slots import SlotConfig
from pipeline.config import StackSettings
from pipeline.demo.feeds import EventFeed, Feed, SampleFeed
from pipeline.demo.lag import GroupLag
from pipeline.demo.procs import ProcessSet
from pipeline.demo.report import (
    Tick,
    Timeline,
    format_tick,
    group_lags,
    resources,
    summarize,
    summary_text,
    write_report,
)
from pipeline.errors import PipelineError

__all__ = ["DemoError", "DemoSettings", "run_demo"]

SOURCES = ("events", "samples")
LATENESS_MS = 1_000  # the joiner's allowed disorder: events are produced in time order
IDLE_MS = 5_000  # quiet streams stop holding the joiner's watermark after this


class DemoError(PipelineError):
    """The demo could not start or one of its processes failed."""


@dataclass(frozen=True)
class DemoSettings:
    """Everything ``pipeline demo`` takes (see ``pipeline demo --help``)."""

    state_dir: Path
    duration_s: float = 120.0
    rate: float = 10000.0
    shards: int = 2
    trainers: int = 2
    model_kind: str = "deepfm"
    source: str = "events"
    window_s: float = 5.0
    dataset: Path | None = None
    dataset_format: str | None = None
    bootstrap: str | None = None
    redis_url: str | None = None
    broker_port: int | None = None
    redis_port: int | None = None
    serve_port: int | None = None
    progress_s: float = 2.0
    publish_interval_s: float = 2.0
    snapshot_interval_s: float = 30.0
    seed: int = 0

    def check(self) -> None:
        if self.duration_s <= 0 or self.rate <= 0 or self.progress_s <= 0:
            raise DemoError("--duration, --rate and the progress interval must be > 0")
        if self.shards < 1 or self.trainers < 1:
            raise DemoError("--shards and --trainers must be >= 1")
        if self.source not in SOURCES:
            raise DemoError(f"--source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if not self.window_s > 0:
            raise DemoError("--window must be > 0 seconds")

    @property
    def joined(self) -> bool:
        """Whether samples come from the joiner (generator events, no dataset)."""
        return self.dataset is None and self.source == "events"


class _Interrupted(Exception):
    """SIGINT/SIGTERM arrived: stop cleanly."""


def _check_state_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise DemoError(f"state dir {path} is not writable: {exc}") from None


def _check_port(what: str, port: int | None) -> None:
    from pipeline.stack import port_in_use

    if port is not None and port_in_use("127.0.0.1", port):
        raise DemoError(f"{what} port {port} is in use; pass another or leave it out (a free one)")


def _layout(settings: DemoSettings) -> tuple[SlotConfig, Any]:
    """The stream layout and, for a dataset, the opened dataset (validates path + format)."""
    if settings.dataset is None:
        from pipeline.ingest.generator import TrafficGenerator

        return TrafficGenerator().slot_config, None
    from pipeline.ingest.adapters import open_dataset

    if not settings.dataset.exists():
        raise DemoError(f"dataset {settings.dataset} does not exist")
    dataset = open_dataset(settings.dataset, settings.dataset_format)
    return dataset.config, dataset


def _write_specs(state: Path, layout: SlotConfig, kind: str, prefix: str) -> tuple[Path, Path, str]:
    from pipeline.train.defaults import default_model, default_tables

    tables = default_tables(layout, prefix=prefix)
    overrides: dict[str, Any] = {} if kind == "lr" else {"hidden": (64, 32)}
    model = default_model(layout, kind=kind, prefix=prefix, **overrides)
    catalog = state / "tables.yaml"
    catalog.write_text(yaml.safe_dump({"tables": [t.to_dict() for t in tables]}))
    spec = state / "model.yaml"
    spec.write_text(yaml.safe_dump(model.to_dict()))
    return catalog, spec, model.dense_table_name()


def _trainer_threads(settings: DemoSettings) -> int:
    """Each trainer's thread budget: its share of the cores; every other role gets one.

    Weights: a trainer 3, each other process 1 (shard servers, joiner, publisher,
    snapshot coordinator, serve). On a 2-core box every role gets one thread.
    """
    from pipeline.threads import available_cpus, share

    roles = {f"train{n}": 3.0 for n in range(settings.trainers)}
    roles |= {f"ps{n}": 1.0 for n in range(settings.shards)}
    roles |= {"join": 1.0, "publish": 1.0, "snapshot": 1.0, "serve": 1.0}
    return share(available_cpus(), roles)["train0"]


def _health(port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.5)
    try:
        conn.request("GET", "/health")
        body: dict[str, Any] = json.loads(conn.getresponse().read())
        return body
    except (OSError, ValueError):
        return {}
    finally:
        conn.close()


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise _Interrupted in the main thread while inside."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Interrupted()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_demo(settings: DemoSettings, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo to the end (or Ctrl-C); returns the summary. Raises DemoError."""
    from pipeline.stack import EmbeddedStack, find_broker_binary, find_redis_binary, free_port

    settings.check()
    state = settings.state_dir.resolve()
    _check_state_dir(state)
    if settings.bootstrap is None:
        find_broker_binary()
        _check_port("broker", settings.broker_port)
    if settings.redis_url is None:
        find_redis_binary()
        _check_port("redis", settings.redis_port)
    _check_port("serve", settings.serve_port)
    layout, dataset = _layout(settings)

    run = uuid.uuid4().hex[:8]
    prefix, job = f"demo{run}.", f"demo{run}"
    catalog, model, dense = _write_specs(state, layout, settings.model_kind, f"d{run}_")
    logs = state / "logs"
    logs.mkdir(exist_ok=True)
    stack = EmbeddedStack(
        StackSettings(
            state_dir=state / "stack",
            broker_port=settings.broker_port or free_port(),
            redis_port=settings.redis_port or free_port(),
            bootstrap=settings.bootstrap,
            redis_url=settings.redis_url,
            start_timeout_s=30,
        )
    )
    procs = ProcessSet(logs, env={"PIPELINE_KAFKA_SESSION_TIMEOUT_MS": "6000"})
    echo(f"demo {job}: state in {state}")
    try:
        with _signals_interrupt():
            services = stack.up()
            try:
                return _run(
                    settings,
                    state,
                    services,
                    stack,
                    procs,
                    layout,
                    dataset,
                    catalog,
                    model,
                    dense,
                    prefix,
                    job,
                    echo,
                )
            finally:
                for name in list(procs.procs):
                    if procs.procs[name].poll() is None:
                        echo(f"stopping {name}")
                procs.stop_all()
    except _Interrupted:
        raise DemoError("interrupted while starting or stopping") from None
    finally:
        stack.down()


def _run(
    settings: DemoSettings,
    state: Path,
    services: dict[str, Any],
    stack: Any,
    procs: ProcessSet,
    layout: SlotConfig,
    dataset: Any,
    catalog: Path,
    model: Path,
    dense: str,
    prefix: str,
    job: str,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    from pipeline.config import RedisSettings, load
    from pipeline.ps.frontclient import connect
    from pipeline.redact import mask_url
    from pipeline.stack import free_port
    from pipeline.topics import apply_topics, load_topic_specs
    from pipeline.train.metrics_sink import RedisMetricsSink

    bootstrap, redis_url = services["kafka"].address, services["redis"].address
    echo(f"broker {bootstrap}, redis {mask_url(redis_url)}, topic prefix {prefix}")
    apply_topics(
        {"bootstrap.servers": bootstrap, "log_level": 0}, load_topic_specs(), prefix=prefix
    )
    kafka = ["--bootstrap", bootstrap, "--prefix", prefix]
    red = ["--redis-url", redis_url]
    client = connect(load(RedisSettings, url=redis_url))  # as the roles it starts connect
    table = f"ps:table:{{{yaml.safe_load(catalog.read_text())['tables'][-1]['name']}}}"

    for s in range(settings.shards):
        procs.start(
            f"ps{s}",
            "ps",
            "--shard",
            str(s),
            "--shards",
            str(settings.shards),
            "--tables",
            str(catalog),
            "--data-dir",
            str(state / f"ps{s}"),
            *red,
        )
    _wait("shard servers", lambda: bool(client.exists(table.encode())), 60, procs)
    trainers = [f"train{n}" for n in range(settings.trainers)]
    trainer_threads = _trainer_threads(settings)
    for n, name in enumerate(trainers):
        procs.start(
            name,
            "train",
            "--config",
            str(model),
            "--tables",
            str(catalog),
            "--job",
            job,
            "--trainer-id",
            f"t{n}",
            *kafka,
            *red,
            threads=trainer_threads,
        )
    snapshots = state / "snapshots"
    procs.start(
        "snapshot",
        "snapshot",
        "run",
        "--dir",
        str(snapshots),
        "--interval",
        str(settings.snapshot_interval_s),
        "--job",
        job,
        "--tables",
        str(catalog),
        "--dense",
        dense,
        *red,
    )
    procs.start(
        "publish",
        "publish",
        "run",
        "--model",
        str(model),
        "--interval",
        str(settings.publish_interval_s),
        *kafka,
        *red,
    )
    port = settings.serve_port or free_port()
    procs.start(
        "serve", "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port), *kafka
    )

    total = int(settings.rate * settings.duration_s)
    feed, bayes = _start_feed(settings, bootstrap, prefix, dataset, total)
    lags = {"train": GroupLag(bootstrap, f"{prefix}train.{job}", [f"{prefix}samples"])}
    if settings.joined:
        window_ms = int(settings.window_s * 1000)
        procs.start(
            "join",
            "join",
            "--slots",
            ",".join(layout.slots),
            "--window-ms",
            str(window_ms),
            "--lateness-ms",
            str(LATENESS_MS),
            "--idle-ms",
            str(IDLE_MS),
            "--positives",
            "close",
            "--linger-ms",
            "250",
            "--checkpoint-interval-s",
            "2",
            *kafka,
        )
        topics = [f"{prefix}events.impressions", f"{prefix}events.clicks"]
        lags["join"] = GroupLag(bootstrap, f"{prefix}joiner", topics)
    feed.start()
    if settings.joined:
        data = f"producing {total} impressions + their clicks ({settings.window_s:g} s window)"
    elif settings.dataset is not None:
        data = f"replaying up to {total} rows of {settings.dataset} at {settings.rate:g}/s"
    else:
        data = f"producing {total} labelled samples"
    echo(
        f"{settings.shards} shard servers, {settings.trainers} trainers, snapshot coordinator, "
        f"publisher, serve on http://127.0.0.1:{port}{', joiner' if settings.joined else ''}; "
        f"{data} over {settings.duration_s:g} s (Ctrl-C stops early)"
    )

    sink = RedisMetricsSink(client, job)
    timeline = Timeline()
    # beside the roles: the stack's processes (when started here) and this one, the feed
    single = {n: s.pid for n, s in services.items() if getattr(s, "pid", None) is not None}
    single["feed"] = os.getpid()
    t0 = time.monotonic()
    first_trained: float | None = None
    last = (t0, 0)
    health: dict[str, Any] = {}
    expected_exits: set[str] = set()

    def tick() -> int:
        nonlocal last, first_trained, health
        counts, _ = sink.global_cumulative()
        trained = int(counts.summary()["samples"])
        now = time.monotonic()
        if trained > 0 and first_trained is None:
            first_trained = now
        rate = (trained - last[1]) / max(1e-6, now - last[0])
        last = (now, trained)
        health = _health(port)
        fresh = health.get("freshness_ms")
        auc = counts.auc() if trained else None
        train_lag = lags["train"].measure()
        join_lag = lags["join"].measure() if "join" in lags else None
        item = Tick(
            round(now - t0, 2),
            feed.expected_samples,
            trained,
            round(rate, 1),
            auc if auc is not None and auc == auc else None,
            health.get("model_version"),
            None if fresh is None else fresh / 1000,
            None if train_lag is None else train_lag[0],
            None if join_lag is None else join_lag[0],
            _window_auc(sink),
            None if train_lag is None else train_lag[1],
            None if join_lag is None else join_lag[1],
        )
        timeline.add(item)
        timeline.add_usage(item.t, procs.usage(single))
        echo(format_tick(item))
        return trained

    def check() -> None:
        failed = [n for n in procs.dead() if n not in expected_exits]
        if failed:
            raise DemoError(f"{failed[0]} exited unexpectedly: {procs.log_tail(failed[0])}")
        if feed.error:
            raise DemoError(feed.error)

    stopped_by = "duration"  # or "data" (all of a shorter dataset trained), "interrupt"
    flowing_t: float | None = None  # first tick with trained samples: every role is up
    data_end_t = 0.0  # last tick while the data (impressions, samples) was still coming
    try:
        trained = 0
        while time.monotonic() - t0 < settings.duration_s:
            time.sleep(settings.progress_s)
            trained = tick()
            data_end_t = timeline.ticks[-1].t
            if trained and flowing_t is None:
                flowing_t = data_end_t
            check()
            if not feed.is_alive() and trained >= feed.expected_samples:
                stopped_by = "data"  # a dataset shorter than rate x duration: done early
                break
        # the generator's last clicks come up to 0.9 windows after its last impression
        while (
            feed.is_alive() and time.monotonic() - t0 < settings.duration_s + 2 * settings.window_s
        ):
            time.sleep(settings.progress_s)
            tick()
            check()
    except _Interrupted:
        stopped_by = "interrupt"
        echo("interrupted: stopping cleanly (Ctrl-C again is ignored until done)")
    except BaseException:
        feed.stop()
        raise
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # stop the data; let the joiner close its windows and the trainers drain the rest
    feed.stop()
    feed.join(35)
    produced = feed.expected_samples
    grace = 30.0 + ((IDLE_MS + LATENESS_MS) / 1000 + settings.window_s if settings.joined else 0)
    drain_until = time.monotonic() + grace
    trained = tick()
    while trained < produced and time.monotonic() < drain_until:
        time.sleep(1.0)
        trained = tick()
        check()
    if trained < produced:
        echo(f"warning: {produced - trained} samples not trained after {grace:g} s of draining")
    train_end = time.monotonic()
    codes = procs.stop([*trainers, "snapshot", "join"], 60)
    for lag in lags.values():
        lag.close()
    bad = {n: c for n, c in codes.items() if n in [*trainers, "join"] and c != 0}
    if bad:
        echo(f"warning: exit codes {bad}")
    echo("taking the last snapshot")
    procs.start(
        "snapshot-final",
        "snapshot",
        "run",
        "--once",
        "--dir",
        str(snapshots),
        "--tables",
        str(catalog),
        "--dense",
        dense,
        *red,
    )
    expected_exits.add("snapshot-final")
    with contextlib.suppress(Exception):
        procs.procs["snapshot-final"].wait(120)
    snap_ok = procs.procs["snapshot-final"].returncode == 0
    if not snap_ok:
        echo(f"warning: the last snapshot failed: {procs.log_tail('snapshot-final')}")
    # one more publish interval so serve can load the final weights
    time.sleep(min(settings.publish_interval_s + 1, 8))
    final = _health(port) or health
    procs.stop(["publish", "serve", *[f"ps{s}" for s in range(settings.shards)]], 30)
    counts, members = sink.global_cumulative()
    trained = int(counts.summary()["samples"])
    auc = counts.auc() if trained else None
    if isinstance(feed, EventFeed):
        bayes = feed.bayes_auc()
    snaps = sorted(p.name for p in snapshots.iterdir() if p.is_dir()) if snapshots.exists() else []
    summary = summarize(
        timeline,
        trained=trained,
        auc=auc,
        bayes_auc=bayes,
        elapsed_s=time.monotonic() - t0,
        train_s=train_end - (first_trained or t0),
        versions=final.get("model_version"),
        snapshot=str(snapshots / snaps[-1]) if snaps and snap_ok else None,
    )
    summary["trainers"] = members
    summary["data_end_s"] = data_end_t
    # RSS and CPU from when samples flow (every role loaded) to the end of the data
    summary["resources"] = resources(timeline, flowing_t or 0.0, data_end_t)
    summary["lags"] = group_lags(timeline, data_end_t)
    summary["stopped_by"] = stopped_by
    summary["interrupted"] = stopped_by == "interrupt"
    summary["samples_expected"] = produced
    if isinstance(feed, EventFeed):
        summary["events"] = {"impressions": feed.impressions, "clicks": feed.clicks}
        sent = feed.impressions + feed.clicks
        summary["feed"] = {
            "behind_s_max": round(feed.behind_s, 3),
            "cpu_us_per_event": round(feed.cpu_s / sent * 1e6, 2) if sent else None,
        }
        summary["joiner"] = _joiner_counters(procs.log_dir / "join.log")
    meta = {
        "job": job,
        "prefix": prefix,
        "bootstrap": bootstrap,
        "redis_url": redis_url,
        "duration_s": settings.duration_s,
        "rate": settings.rate,
        "shards": settings.shards,
        "trainers": settings.trainers,
        "model": settings.model_kind,
        "data": str(settings.dataset)
        if settings.dataset
        else f"synthetic generator ({settings.source})",
        "attribution_window_s": settings.window_s if settings.joined else None,
        "pids": {n: p.pid for n, p in procs.procs.items()},
    }
    paths = write_report(state / "report", timeline, summary, meta)
    echo("")
    echo(summary_text(summary))
    echo(f"report: {paths[0].parent} ({', '.join(p.name for p in paths)})")
    return summary


def _start_feed(
    settings: DemoSettings, bootstrap: str, prefix: str, dataset: Any, total: int
) -> tuple[Feed, float | None]:
    """The data feed (not started) and the best AUC a model can reach on it, if known."""
    from pipeline.ingest.generator import TrafficConfig, TrafficGenerator

    rows = max(50, min(2000, int(settings.rate / 4)))  # about 4 messages a second
    if dataset is not None:
        batches = dataset.batches(batch_rows=rows, limit=total)
        return SampleFeed(bootstrap, f"{prefix}samples", batches, settings.rate, restamp=True), None
    now = int(time.time() * 1000)
    if not settings.joined:
        gen = TrafficGenerator(
            TrafficConfig(seed=settings.seed, rate=settings.rate, start_time_ms=now)
        )
        batches = (batch for batch, _ in gen.samples(total, rows))
        feed: Feed = SampleFeed(
            bootstrap, f"{prefix}samples", batches, settings.rate, restamp=False
        )
        return feed, gen.bayes_auc(min(total, 100_000))
    window_ms = int(settings.window_s * 1000)
    gen = TrafficGenerator(
        TrafficConfig(
            seed=settings.seed,
            rate=settings.rate,
            start_time_ms=now,
            attribution_window_ms=window_ms,
            mean_click_delay_ms=max(1, window_ms // 5),
        )
    )
    feed = EventFeed(bootstrap, f"{prefix}events.impressions", f"{prefix}events.clicks", gen, total)
    return feed, None  # the feed knows the Bayes AUC of what it produced once it is done


def _window_auc(sink: Any) -> float | None:
    """Global AUC of the newest metrics window every trainer has moved past (the newest
    one may still be filling), or None before two windows exist."""
    starts = sink.windows(2)
    if len(starts) < 2:
        return None
    counts, _ = sink.global_window(starts[1])
    if not counts.summary()["samples"]:
        return None
    auc = float(counts.auc())
    return auc if auc == auc else None


def _joiner_counters(log_path: Path) -> dict[str, int] | None:
    """The counters ``pipeline join`` prints as its last line (None when missing)."""
    try:
        lines = log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                counters: dict[str, int] = json.loads(line)
            except ValueError:
                return None
            return counters
    return None


def _wait(what: str, done: Callable[[], bool], timeout: float, procs: ProcessSet) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        dead = procs.dead()
        if dead:
            raise DemoError(f"{dead[0]} exited while waiting for {what}: {procs.log_tail(dead[0])}")
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)
