"""The faust engine of the joiner: a thin faust app over :class:`JoinEngine`.

Two agents (impressions, clicks) feed the same engine on one event loop, each in
batches (``take_events``: the bulk decode and join of the engine); a timer
advances idle watermarks, flushes lingering batches and writes checkpoints. Each
input partition's checkpoint (state + the input offsets it covers) is a value in the
faust Table ``state`` (changelog ``<app id>-state-changelog``), keyed and
partitioned by input partition. Events are consumed with ``noack()`` and acked only
once a checkpoint covering them is written, so faust commits offsets no further
than the checkpoint; a restarted worker skips events its checkpoint already covers.

Limits (``docs/joiner.md``): no scan of earlier output after a crash (samples since
the last checkpoint may repeat), no librdkafka pass-through (TLS and SASL
PLAIN/SCRAM are mapped onto aiokafka by :mod:`pipeline.joiner.faustauth`), and on
the embedded broker table recovery can miss the newest changelog record (its
ListOffsets end offset is too low). Use the ``confluent`` engine where restarts
must be exact.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from pipeline.config import KafkaSettings
from pipeline.errors import PipelineError
from pipeline.joiner.engine import JoinEngine, OutRecord
from pipeline.joiner.faustauth import broker_credentials
from pipeline.joiner.logic import Counters
from pipeline.joiner.output import SampleBatcher
from pipeline.joiner.runner import join_config, topics_for
from pipeline.joiner.settings import JoinerSettings
from pipeline.kafka import admin

__all__ = ["make_app", "run_faust"]

BATCH = 2000  # events an agent joins together (or what arrived within 50 ms)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _counts(settings: KafkaSettings, topics: list[str]) -> tuple[list[int], int]:
    """Partition counts of ``topics`` and the number of brokers."""
    meta = admin(settings).list_topics(timeout=10)
    counts = []
    for topic in topics:
        if topic not in meta.topics:
            raise PipelineError(f"topic {topic} does not exist (run `pipeline topics apply`)")
        counts.append(len(meta.topics[topic].partitions))
    return counts, len(meta.brokers)


class _Stopper:
    """Lets the app's timer stop the worker that runs it (set once the worker exists)."""

    worker: Any = None
    task: Any = None

    async def __call__(self) -> None:
        if self.worker is not None:
            await self.worker.stop()
            starting = getattr(self.worker, "_starting_fut", None)
            if starting is not None:
                starting.cancel()


def make_app(
    settings: JoinerSettings,
    kafka: KafkaSettings,
    prefix: str = "",
    stop: threading.Event | None = None,
    datadir: str | None = None,
) -> tuple[Any, JoinEngine, _Stopper]:
    """The faust app (not started), the engine it drives, and its stopper.

    ``datadir`` is faust's working folder (a new temporary one when None); the
    tables live in memory and in their changelog topics, not there.
    """
    import faust
    from faust.types import TP

    credentials = broker_credentials(kafka)  # refuses what aiokafka cannot honour
    topics = topics_for(settings, prefix)
    (n_imp, _, n_samples, n_dlq), brokers = _counts(
        kafka, [topics.impressions, topics.clicks, topics.samples, topics.dlq]
    )
    batcher = SampleBatcher(
        settings.slot_config(),
        n_samples,
        settings.batch_size,
        settings.linger_ms,
        settings.negative_rate,
    )
    engine = JoinEngine(join_config(settings), topics, batcher, n_dlq)
    app = faust.App(
        f"{prefix}{settings.app_id}",
        broker=f"kafka://{kafka.bootstrap}",
        broker_credentials=credentials,
        store="memory://",
        datadir=datadir or tempfile.mkdtemp(prefix="joiner-faust-"),
        processing_guarantee="at_least_once",
        broker_session_timeout=kafka.session_timeout_ms / 1000,
        broker_heartbeat_interval=max(0.5, kafka.session_timeout_ms / 4000),
        consumer_auto_offset_reset=settings.start_from,
        topic_replication_factor=min(3, max(1, brokers)),
        topic_partitions=n_imp,
        table_standby_replicas=0,
        stream_wait_empty=False,
        web_enabled=False,
    )

    def raw_topic(name: str) -> Any:
        return app.topic(name, key_serializer="raw", value_serializer="raw")

    imp_topic, clk_topic = raw_topic(topics.impressions), raw_topic(topics.clicks)
    out_topics = {name: raw_topic(name) for name in (topics.samples, topics.dlq)}
    # Checkpoints as base64 text: the table's default (json) codec round-trips it as is.
    state = app.Table("state", default=None, partitions=n_imp, key_type=str, value_type=str)
    stopper = _Stopper()
    held: dict[int, list[Any]] = defaultdict(list)  # events waiting for a checkpoint
    last_checkpoint = [_now_ms()]
    interval_ms = int(settings.checkpoint_interval_s * 1000)

    async def send(records: list[OutRecord]) -> None:
        for rec in records:
            await out_topics[rec.topic].send(
                key=rec.key, value=rec.value, partition=rec.partition, headers=rec.headers
            )

    async def on_events(events: Sequence[Any]) -> None:
        """Join a batch of one agent's events in bulk (acked later, at a checkpoint)."""
        now = _now_ms()
        todo = []
        for event in events:
            msg = event.message
            p = msg.partition
            if p not in engine.joiners:
                saved = state.get(str(p))
                engine.assign(p, None if saved is None else [base64.b64decode(saved)], now)
            stream = "impressions" if msg.topic == topics.impressions else "clicks"
            if msg.offset < engine.positions[p].get(stream, 0):
                event.ack()  # covered by the restored checkpoint
                continue
            todo.append(event)
            held[p].append(event)
        if todo:
            msgs = [e.message for e in todo]
            out = engine.handle_many(
                [m.topic for m in msgs],
                [m.partition for m in msgs],
                [m.value or b"" for m in msgs],
                now,
                lambda i: int(msgs[i].offset),
                lambda i: msgs[i].key,
            )
            await send(out)

    async def checkpoint() -> None:
        """Write every partition's state, then ack the events it covers."""
        await send(engine.drain())
        for p in list(engine.joiners):
            blob = base64.b64encode(engine.checkpoint(p)).decode()
            state.data[str(p)] = blob
            state.send_changelog(p, str(p), blob)  # changelog partition = input partition
            for event in held.pop(p, []):
                event.ack()  # faust commits offsets only up to acked events

    @app.agent(imp_topic)
    async def impressions(stream: Any) -> None:
        async for events in stream.noack().take_events(BATCH, within=0.05):
            await on_events(events)

    @app.agent(clk_topic)
    async def clicks(stream: Any) -> None:
        async for events in stream.noack().take_events(BATCH, within=0.05):
            await on_events(events)

    @app.timer(0.1)
    async def tick() -> None:
        now = _now_ms()
        for p, positions in list(engine.positions.items()):
            for stream, topic in (("impressions", topics.impressions), ("clicks", topics.clicks)):
                high = app.consumer.highwater(TP(topic, p))
                if high is None or positions.get(stream, 0) < high:
                    engine.mark_busy(p, topic, now)
        await send(engine.tick(now))
        stopping = stop is not None and stop.is_set()
        if stopping or now - last_checkpoint[0] >= interval_ms:
            await checkpoint()
            last_checkpoint[0] = now
        if stopping and stop is not None and stopper.task is None:
            await app.producer.flush()
            stopper.task = asyncio.ensure_future(stopper())

    def on_revoked(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        revoked = args[0] if args else kwargs.get("revoked", set())
        for tp in revoked:
            if tp.topic == topics.impressions:
                engine.revoke(tp.partition)  # un-acked events go to the next owner
                held.pop(tp.partition, None)

    app.on_partitions_revoked.connect(on_revoked)
    return app, engine, stopper


def run_faust(
    settings: JoinerSettings, kafka: KafkaSettings, prefix: str, stop: threading.Event
) -> Counters:
    """Run the faust worker until SIGTERM/SIGINT (or ``stop``); returns the totals."""
    import faust

    datadir = tempfile.TemporaryDirectory(prefix="joiner-faust-")
    app, engine, stopper = make_app(settings, kafka, prefix, stop, datadir.name)

    class Worker(faust.Worker):
        """SIGTERM/SIGINT set ``stop`` (the CLI's handlers), so the app checkpoints and
        acks before it stops, instead of faust's own handlers stopping it mid-window."""

        def install_signal_handlers(self) -> None:
            pass

    worker = Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False)
    stopper.worker = worker
    with datadir, contextlib.suppress(SystemExit):
        worker.execute_from_commandline()
    return engine.counters()
