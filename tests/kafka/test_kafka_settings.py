"""Settings, topic layout and the shipped docker-compose file (no broker needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from squadbus.backends.kafka import Idempotence, KafkaSettings, TopicLayout, from_url
from squadbus.core.errors import ConfigError
from squadbus.core.registry import open_backend

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "kafka" / "docker-compose.yml"


def test_url_parsing_and_defaults() -> None:
    s = KafkaSettings.from_url(
        "kafka://k1:9092,k2?partitions=12&retention_ms=3600000&idempotence=ON&topic=squad&session_timeout_ms=3000"
        "&heartbeat_interval_ms=1000&create_topics=false&publish_timeout=2.5"
    )
    assert s.bootstrap_servers == ("k1:9092", "k2:9092")
    assert (s.partitions, s.retention_ms, s.idempotence) == (12, 3_600_000, Idempotence.ON)
    assert s.topics == ("squad", "squad-replies", "squad-dlq", "squad.inbox", "squad.broadcasts")
    assert s.create_topics is False and s.publish_timeout == 2.5
    default = KafkaSettings.from_url("kafka://")
    assert default.bootstrap_servers == ("127.0.0.1:9092",)
    assert default.topic == "agent-messages" and default.idempotence is Idempotence.AUTO


@pytest.mark.parametrize("url", [
    "redis://x", "kafka://h?nope=1", "kafka://h?partitions=0", "kafka://h?idempotence=maybe",
    "kafka://h?topic=bad/name", "kafka://h?heartbeat_interval_ms=5000&session_timeout_ms=3000",
    "kafka://h?create_topics=perhaps", "kafka://h:port", "kafka://h?topic=a&dlq_topic=a",
])
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        KafkaSettings.from_url(url)


def test_registry_builds_the_backend_without_connecting() -> None:
    backend = open_backend("kafka://127.0.0.1:1?partitions=2")
    assert backend.name == "kafka"
    assert from_url("kafka://127.0.0.1:1").settings.partitions == 8


@pytest.mark.parametrize(("subject", "topic"), [
    ("agent.message.dev-1", "m"), ("agent.message.broadcast", "m"), ("agent.message.domain.dev", "m"),
    ("agent.reply.abc.123", "m-replies"), ("agent.dlq.db-writer", "m-dlq"), ("other.thing", "m"),
    ("agent.dlq", "m"),
])
def test_subject_to_topic(subject: str, topic: str) -> None:
    assert TopicLayout(KafkaSettings(topic="m")).topic_for(subject) == topic


@pytest.mark.parametrize(("pattern", "topics"), [
    ("agent.message.dev-1", ["m"]), ("agent.message.>", ["m"]), ("agent.message.domain.*", ["m.broadcasts"]),
    ("agent.message.broadcast", ["m.broadcasts"]), ("agent.message.domain.>", ["m.broadcasts"]),
    ("agent.message.domain.dev", ["m.broadcasts"]), ("agent.message.*", ["m"]), ("agent.message.*.>", ["m"]),
    ("agent.message.domain", ["m"]), ("agent.*.domain.dev", ["m", "m-replies", "m-dlq"]),
    ("agent.reply.tok.*", ["m-replies"]), ("agent.dlq.g", ["m-dlq"]), ("agent.dlq.>", ["m-dlq"]),
    ("agent.>", ["m", "m-replies", "m-dlq"]), (">", ["m", "m-replies", "m-dlq"]),
    ("agent.*.x", ["m", "m-replies", "m-dlq"]), ("agent.*", ["m"]), ("*.dlq.g", ["m", "m-dlq"]),
])
def test_pattern_to_topics(pattern: str, topics: list[str]) -> None:
    """A pattern matching broadcasts only reads the broadcast topic; with ``broadcasts_apart`` off, the main one."""
    assert TopicLayout(KafkaSettings(topic="m")).topics_for(pattern) == topics
    apart_off = TopicLayout(KafkaSettings(topic="m", broadcasts_apart=False))
    assert apart_off.topics_for(pattern) == [t.replace("m.broadcasts", "m") for t in topics]


def test_broadcast_topic_is_named_after_the_main_topic_and_apart_from_the_others() -> None:
    settings = from_url("kafka://h:1?topic=sq&broadcast_topic=sq-b").settings
    assert settings.broadcast_topic == "sq-b" and settings.broadcasts_apart
    assert KafkaSettings(topic="sq").topics == ("sq", "sq-replies", "sq-dlq", "sq.inbox", "sq.broadcasts")
    assert KafkaSettings(topic="sq", broadcasts_apart=False).topics == ("sq", "sq-replies", "sq-dlq", "sq.inbox")
    assert TopicLayout(KafkaSettings(topic="sq")).all == ("sq", "sq-replies", "sq-dlq", "sq.broadcasts")
    assert [KafkaSettings(topic="sq").partitions_of(t) for t in ("sq", "sq.inbox", "sq.broadcasts")] == [8, 8, 1]
    with pytest.raises(ConfigError, match="broadcast_partitions"):
        from_url("kafka://h:1?broadcast_partitions=0")
    with pytest.raises(ConfigError, match="different topics"):
        KafkaSettings(topic="sq", broadcast_topic="sq-replies")
    with pytest.raises(ConfigError, match="invalid Kafka topic name"):
        from_url("kafka://h:1?broadcast_topic=a%20b")


def test_compose_file_is_single_node_kraft_without_zookeeper() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"kafka"}, "one Kafka node, no ZooKeeper"
    kafka = services["kafka"]
    image, _, tag = kafka["image"].partition(":")
    assert image == "apache/kafka" and tag.split(".")[0] in {"3", "4"}
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env
    assert "9092:9092" in kafka["ports"]
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_group_timeouts_tuned_for_tansu_unless_the_url_sets_them() -> None:
    plain = KafkaSettings.from_url("kafka://h")
    tuned = plain.for_broker("tansu_cluster")
    assert (tuned.session_timeout_ms, tuned.heartbeat_interval_ms) == (3000, 1000)
    assert plain.for_broker("MkU3OEVBNTcwNTJENDM2Qk") is plain  # Apache Kafka: a random cluster id
    assert plain.for_broker(None) is plain
    session = KafkaSettings.from_url("kafka://h?session_timeout_ms=6000").for_broker("tansu_cluster")
    assert (session.session_timeout_ms, session.heartbeat_interval_ms) == (6000, 1000)
    both = KafkaSettings.from_url("kafka://h?session_timeout_ms=8000&heartbeat_interval_ms=2000&fetch_max_wait_ms=100")
    assert both.for_broker("tansu_cluster") is both


def test_fetch_wait_tuned_for_tansu_unless_the_url_sets_it() -> None:
    """tansu's fetch polls its storage until the wait ends, so the wait is latency there (scenario 5, 4 hosts:
    p99 54-58 ms at 100, 31-35 at 50); Apache Kafka answers a waiting fetch on arrival and keeps 100."""
    plain = KafkaSettings.from_url("kafka://h")
    assert plain.fetch_max_wait_ms == 100
    assert plain.for_broker("tansu_cluster").fetch_max_wait_ms == 50
    assert plain.for_broker("MkU3OEVBNTcwNTJENDM2Qk").fetch_max_wait_ms == 100
    assert KafkaSettings.from_url("kafka://h?fetch_max_wait_ms=100").for_broker("tansu_cluster").fetch_max_wait_ms \
        == 100
    given = KafkaSettings.from_url("kafka://h?fetch_max_wait_ms=20&session_timeout_ms=8000&heartbeat_interval_ms=2000")
    assert given.for_broker("tansu_cluster") is given


def test_a_zero_fetch_wait_is_refused_on_tansu_only() -> None:
    zero = KafkaSettings.from_url("kafka://h?fetch_max_wait_ms=0")
    with pytest.raises(ConfigError, match="fetch_max_wait_ms=0 on tansu"):
        zero.for_broker("tansu_cluster")
    assert zero.for_broker("MkU3OEVBNTcwNTJENDM2Qk") is zero  # Apache Kafka answers a zero wait at once
