"""A round trip through the real broker: produce sample batches, consume, verify.

``pipeline smoke`` runs it against the configured cluster; it proves topics,
the SampleBatch codec and a consumer group work end to end, and reports the
throughput it saw.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.codec.samplebatch import SampleBatch, decode_batch, encode_batch
from pipeline.codec.slots import SlotConfig
from pipeline.config import KafkaSettings
from pipeline.errors import PipelineError
from pipeline.kafka import consumer, producer

__all__ = ["RoundTrip", "random_batch", "roundtrip"]

CRITEO_LIKE = SlotConfig(tuple(f"C{i}" for i in range(1, 27)), 13)


@dataclass(frozen=True)
class RoundTrip:
    """What a round trip moved and how fast."""

    batches: int
    samples: int
    bytes: int
    produce_s: float
    consume_s: float


def random_batch(config: SlotConfig, rows: int, rng: np.random.Generator) -> SampleBatch:
    """A valid batch with one id per slot and row (Zipf-like ids), for smoke tests."""
    slots = len(config.slots)
    offsets = (
        np.arange(rows + 1, dtype=np.int32)[None, :] + rows * np.arange(slots)[:, None]
    ).astype(np.int32)
    ids = rng.zipf(1.2, size=rows * slots).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return SampleBatch(
        labels=(rng.random(rows) < 0.2).astype(np.float32),
        weights=np.ones(rows, np.float32),
        event_times=np.full(rows, int(time.time() * 1000), np.int64),
        slots=config.slots,
        offsets=offsets,
        ids=ids,
        dense=rng.random((rows, config.dense_dim), dtype=np.float32),
        fingerprint=config.fingerprint,
    )


def roundtrip(
    settings: KafkaSettings,
    topic: str,
    batches: Sequence[SampleBatch],
    group_id: str | None = None,
    timeout_s: float = 60.0,
) -> RoundTrip:
    """Produce ``batches`` to ``topic``, consume them in a fresh group, check equality."""
    payloads = [encode_batch(b) for b in batches]
    run = uuid.uuid4().hex.encode()
    errors: list[str] = []
    prod = producer(settings)
    start = time.perf_counter()
    for i, payload in enumerate(payloads):
        prod.produce(
            topic,
            payload,
            key=b"%s-%d" % (run, i),
            on_delivery=lambda err, _msg: errors.append(str(err)) if err else None,
        )
        prod.poll(0)
    if prod.flush(timeout_s) or errors:
        raise PipelineError(f"producing to {topic} failed: {errors[:3] or 'flush timed out'}")
    produce_s = time.perf_counter() - start

    cons = consumer(settings, group_id or f"smoke-{run.decode()[:8]}")
    cons.subscribe([topic])
    received: dict[int, SampleBatch] = {}
    deadline = time.monotonic() + timeout_s
    start = time.perf_counter()
    try:
        while len(received) < len(payloads):
            if time.monotonic() > deadline:
                got = f"{len(received)} of {len(payloads)}"
                raise PipelineError(f"consumed {got} batches from {topic} in {timeout_s:g} s")
            for msg in cons.consume(num_messages=500, timeout=0.5):
                if msg.error():
                    raise PipelineError(f"consuming {topic}: {msg.error()}")
                key = msg.key() or b""
                if not key.startswith(run):
                    continue  # an earlier run's message
                received[int(key.rsplit(b"-", 1)[1])] = decode_batch(msg.value())
        cons.commit(asynchronous=False)
    finally:
        cons.close()
    consume_s = time.perf_counter() - start
    for i, batch in enumerate(batches):
        if not received[i].equals(batch):
            raise PipelineError(f"batch {i} came back different from what was produced")
    return RoundTrip(
        len(batches),
        sum(b.num_rows for b in batches),
        sum(map(len, payloads)),
        produce_s,
        consume_s,
    )
