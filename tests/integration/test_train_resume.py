"""Resuming a trainer group at a snapshot's offsets (pipeline train --resume)."""

from __future__ import annotations

import pytest
from confluent_kafka import Producer

from pipeline.codec.samplebatch import encode_batch
from pipeline.codec.slots import SlotConfig
from pipeline.config import KafkaSettings
from pipeline.errors import PipelineError
from pipeline.ingest.generator import SLOTS, TrafficConfig, TrafficGenerator
from pipeline.train.dataset import QueueDataset
from pipeline.train.resume import seek_group

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_group_starts_at_the_committed_snapshot_offsets(
    kafka_bootstrap: str, project_topics: dict[str, str], group_id: str
) -> None:
    topic = project_topics["samples"]
    batches = [b for b, _ in TrafficGenerator(TrafficConfig(seed=2)).samples(1000, 100)]
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for batch in batches:
        producer.produce(topic, encode_batch(batch), partition=0)
    assert producer.flush(30) == 0
    settings = KafkaSettings(bootstrap=kafka_bootstrap)
    seek_group(settings, group_id, {(topic, 0): 7})
    ds = QueueDataset(settings, topic, group_id, SlotConfig(SLOTS), 100, dlq=None)
    ds.start()
    try:
        sources = []
        while len(sources) < 3:
            item = ds.get(30.0)
            assert item is not None, "no batch after the seek"
            sources.extend(item.completes)
    finally:
        ds.close()
    assert [s[2] for s in sources] == [7, 8, 9]  # resumed exactly at the snapshot's cut


def test_resume_without_offsets_is_refused(kafka_bootstrap: str, group_id: str) -> None:
    with pytest.raises(PipelineError, match="no trainer offsets"):
        seek_group(KafkaSettings(bootstrap=kafka_bootstrap), group_id, {})
