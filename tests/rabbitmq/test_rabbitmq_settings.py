"""amqp:// URLs, names on the broker and subject translation (no server needed)."""

from __future__ import annotations

import zlib

import pytest

from squadbus.backends.rabbitmq import RabbitBackend
from squadbus.backends.rabbitmq.placement import host_of, host_url
from squadbus.backends.rabbitmq.settings import Profile, RabbitSettings
from squadbus.backends.rabbitmq.topology import (
    binding_key,
    direct_recipient,
    inbox_partition,
    inbox_route,
    needs_filter,
    routing_key,
    short_name,
)
from squadbus.core.errors import ConfigError, InvalidSubject
from squadbus.core.registry import open_backend


def test_defaults_and_a_full_url() -> None:
    plain = RabbitSettings.from_url("amqp://")
    assert (plain.host, plain.port, plain.user, plain.vhost, plain.tls) == ("127.0.0.1", 5672, "guest", "/", False)
    assert plain.profile is Profile.DURABLE and plain.exchange == "squadbus" and plain.log_queue == "squadbus.log"
    s = RabbitSettings.from_url(
        "amqps://al%40ce:p%2Fss@mq.example:5999/prod%2Fa?namespace=squad-a&log_max_age=60&publish_timeout=2")
    assert (s.host, s.port, s.user, s.password, s.vhost, s.tls) == ("mq.example", 5999, "al@ce", "p/ss", "prod/a", True)
    assert (s.namespace, s.log_max_age, s.publish_timeout) == ("squad-a", 60.0, 2.0)
    assert s.group_queue("db-writer-1234abcd") == "squad-a.group.db-writer-1234abcd"
    assert RabbitSettings.from_url("amqps://h/").port == 5671
    assert RabbitSettings.from_url("amqp://h/%2F").vhost == "/"
    assert not plain.single_active_consumer
    assert RabbitSettings.from_url("amqp://h/?single_active_consumer=true").single_active_consumer
    fast = RabbitSettings.from_url("amqp://h/?profile=fast")
    assert fast.profile is Profile.FAST and fast.classic_queues and not plain.classic_queues


def test_redacted_hides_the_password_and_the_driver_url_round_trips() -> None:
    s = RabbitSettings.from_url("amqp://alice:s3cret@127.0.0.1:5673/dev")
    assert s.redacted() == "amqp://alice:***@127.0.0.1:5673/dev"
    assert "s3cret" not in s.redacted()
    assert RabbitSettings.from_url(s.driver_url()) == s


@pytest.mark.parametrize("url", [
    "amqp://h/?nope=1", "amqp://h/?namespace=a.b", "amqp://h/?publish_timeout=0", "amqp://h/?profile=quick",
    "amqp://h:99999/", "redis://h/", "amqp://h/?log_max_bytes=-1",
])
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        RabbitSettings.from_url(url)


def test_the_registry_knows_both_schemes() -> None:
    assert isinstance(open_backend("amqp://127.0.0.1:5672/"), RabbitBackend)
    assert open_backend("amqps://mq.example/").settings.tls  # type: ignore[attr-defined]


def test_patterns_become_binding_keys() -> None:
    assert binding_key("agent.>") == "agent.#"
    assert binding_key("agent.message.*") == "agent.message.*"
    assert binding_key("agent.message.domain.*") == "agent.message.domain.*"
    # A literal '#' token is a legal agent id but an AMQP wildcard: bound as one word, filtered by the consumer.
    assert binding_key("agent.message.#") == "agent.message.*"
    assert needs_filter("agent.message.#") and not needs_filter("agent.message.*")


def test_amqp_short_string_limits() -> None:
    assert routing_key("agent.message." + "é" * 100) == "agent.message." + "é" * 100  # 214 bytes
    with pytest.raises(InvalidSubject, match="255"):
        routing_key("agent.message." + "é" * 130)  # 274 bytes
    long = "squadbus.group." + "x" * 300
    cut = short_name(long)
    assert len(cut.encode()) <= 255 and cut != short_name(long + "y")
    assert short_name("short") == "short"


def test_inbox_partition_options_and_routing() -> None:
    plain = RabbitSettings.from_url("amqp://h/?namespace=sq")
    assert (plain.inbox_partitions, plain.inbox_hosts, plain.inbox_prefetch) == (16, 0, 1000)
    assert plain.owned_inbox_partitions == frozenset(range(16))
    assert plain.inbox_partition_queue(3) == "sq.inboxes.3"
    placed = RabbitSettings.from_url("amqp://h/?inbox_partitions=6&inbox_hosts=4&inbox_host=1&inbox_unclaimed=5")
    assert placed.owned_inbox_partitions == frozenset({1, 5}) and placed.inbox_unclaimed == 5.0
    for bad in ("inbox_partitions=0", "inbox_hosts=2&inbox_host=2", "inbox_hosts=-1", "inbox_prefetch=0",
                "inbox_unclaimed=0"):
        with pytest.raises(ConfigError):
            RabbitSettings.from_url(f"amqp://h/?{bad}")
    assert [direct_recipient(s) for s in ("agent.message.bob", "agent.message.broadcast",
                                          "agent.message.domain.dev", "agent.reply.x", "agent.message.")] == [
        "bob", None, None, None, None]
    assert inbox_partition("bob", 16) == zlib.crc32(b"bob") % 16 and inbox_route(7) == "_inbox.7"
    agents = [f"a{i}" for i in range(200)]
    assert {host_of("amqp://h/?inbox_partitions=4", a, 2) for a in agents} == {0, 1}
    assert host_url("amqp://h/", 1, 3) == "amqp://h/?inbox_hosts=3&inbox_host=1"
