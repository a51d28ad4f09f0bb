"""What a Kafka broker here cannot be made to do (Tansu has no retention deletes): offsets gone before they were read.

The consumer is an in-memory double of the few kafka-python calls involved; the
real broker paths are in tests/integration/test_kafka.py.
"""

import pytest
from kafka import TopicPartition
from kafka.errors import OffsetOutOfRangeError

from everlearn.daemon.kafka_config import KafkaConfig
from everlearn.daemon.metrics import Metrics
from everlearn.daemon.source_kafka import KafkaSource

pytestmark = pytest.mark.unit

TP = TopicPartition("news", 2)


class Consumer:
    def __init__(self, log_start: int):
        self.log_start, self.seeks, self.rewound = log_start, [], []

    def poll(self, timeout_ms, max_records):
        if not self.seeks:
            raise OffsetOutOfRangeError({TP: 3})
        return {}

    def beginning_offsets(self, partitions):
        return {tp: self.log_start for tp in partitions}

    def seek(self, tp, offset):
        self.seeks.append((tp, offset))

    def seek_to_beginning(self, tp):
        self.rewound.append(tp)

    def highwater(self, tp):
        return None

    def topics(self):
        return {"news"}


def _source(consumer):
    events = []
    src = KafkaSource("kafka://b:9092/news", KafkaConfig(), Metrics(), lambda name, fields: events.append((name, fields)))
    src.seek({"format": "kafka", "offsets": {"news": {"2": 3}}})
    src._consumer, src.assigned = consumer, {TP}
    return src, events


def test_offsets_deleted_by_retention_are_reported_with_the_range_and_skipped():
    src, events = _source(Consumer(log_start=10))
    assert src.poll(10) == []
    assert events == [("kafka_offsets_skipped", {"topic": "news", "partition": 2, "from": 3, "to": 10, "records": 7})]
    assert src.metrics.registry.get_sample_value("everlearn_kafka_offsets_skipped_total", {"topic": "news"}) == 7
    assert src._consumer.seeks == [(TP, 10)]
    assert src.position() == {"format": "kafka", "offsets": {"news": {"2": 10}}}


def test_a_position_past_the_log_end_is_reported_and_read_from_the_start():
    src, events = _source(Consumer(log_start=0))
    assert src.poll(10) == []
    assert [name for name, _ in events] == ["kafka_offsets_reset"] and events[0][1]["position"] == 3
    assert src._consumer.rewound == [TP] and src.position() == {"format": "kafka", "offsets": {}}


def test_a_position_of_another_kind_of_source_starts_the_topics_afresh():
    src = KafkaSource("kafka://b:9092/news", KafkaConfig(), None, None)
    src.seek({"format": 2, "dirs": {}, "files": {}})
    assert src.position() == {"format": "kafka", "offsets": {}}
