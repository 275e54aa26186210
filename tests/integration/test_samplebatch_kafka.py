"""SampleBatch messages through the real broker: what is consumed equals what was produced."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.codec.samplebatch import SampleBatch, decode_batch, encode_batch
from pipeline.config import KafkaSettings
from pipeline.smoke import CRITEO_LIKE, random_batch, roundtrip
from tests.strategies import sample_batches

pytestmark = pytest.mark.integration


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches=st.lists(sample_batches(), min_size=1, max_size=6))
def test_hypothesis_batches_roundtrip_through_broker(
    batches: list[SampleBatch], kafka_conf: dict[str, object], project_topics: dict[str, str]
) -> None:
    topic = project_topics["samples.dlq"]  # one partition: order is preserved
    # Examples share the topic; a per-example key tells them apart (the embedded broker's
    # end-offset answer is unreliable, so we read from the start and filter).
    run = uuid.uuid4().bytes
    producer = Producer(dict(kafka_conf))
    cons = Consumer({**kafka_conf, "group.id": "unused", "enable.auto.commit": False})
    for batch in batches:
        producer.produce(topic, encode_batch(batch), key=run)
    assert producer.flush(30) == 0
    cons.assign([TopicPartition(topic, 0, 0)])
    got: list[SampleBatch] = []
    for _ in range(100):
        for msg in cons.consume(num_messages=100, timeout=0.5):
            assert not msg.error(), msg.error()
            if msg.key() == run:
                got.append(decode_batch(msg.value()))
        if len(got) >= len(batches):
            break
    cons.close()
    assert len(got) == len(batches)
    for sent, received in zip(batches, got, strict=True):
        assert received.equals(sent)
        assert np.array_equal(received.ids, sent.ids)
        assert np.array_equal(received.offsets, sent.offsets)
        assert np.array_equal(received.dense, sent.dense)


def test_consumer_group_roundtrip_of_criteo_like_batches(
    kafka_bootstrap: str, project_topics: dict[str, str], group_id: str
) -> None:
    rng = np.random.default_rng(7)
    batches = [random_batch(CRITEO_LIKE, 512, rng) for _ in range(12)]
    settings_ = KafkaSettings(bootstrap=kafka_bootstrap, session_timeout_ms=4000)
    result = roundtrip(settings_, project_topics["samples"], batches, group_id=group_id)
    assert (result.batches, result.samples) == (12, 12 * 512)
