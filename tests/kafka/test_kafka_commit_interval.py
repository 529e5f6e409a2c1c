"""Consumer settings on tansu. ``commit_interval_ms``: a group member and the inbox hub commit their settled
floor at most that often (each commit is a broker write; once per settled batch they were a fifth of tansu's
CPU in bench_inboxes_kafka at 280 msgs/s); close still commits what is settled, so a restart redelivers
nothing. ``fetch_max_wait_ms=0`` is refused on tansu, whose fetches would then never return a record."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from squadbus.backends.kafka import KafkaBackend, KafkaSettings
from squadbus.backends.kafka._driver import AIOKafkaAdminClient, TopicPartition
from squadbus.core import subjects
from squadbus.core.backend import Delivery
from squadbus.core.bus import Bus
from squadbus.core.errors import ConfigError
from squadbus.testing.servers.kafka import TansuServer

pytestmark = pytest.mark.kafka

TIMEOUT = 30.0
PARTITIONS = 2
HELD = 1.0  # how long a second commit must not come within a 60 s interval


def _url(tansu: TansuServer) -> str:
    tag = uuid.uuid4().hex[:10]
    return (f"{tansu.url}?partitions={PARTITIONS}&idempotence=off&topic=t-{tag}&inbox_group=ib-{tag}"
            "&session_timeout_ms=2000&heartbeat_interval_ms=500&commit_interval_ms=60000")


async def _committed(settings: KafkaSettings, group_id: str, topic: str) -> int:
    """The offsets ``group_id`` committed on ``topic``, summed over its partitions."""
    admin = AIOKafkaAdminClient(bootstrap_servers=list(settings.bootstrap_servers))
    await admin.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        offsets = await admin.list_consumer_group_offsets(group_id, partitions=tps)
    finally:
        await admin.close()
    return sum(max(0, meta.offset) for meta in offsets.values())


async def _until_committed(settings: KafkaSettings, group_id: str, topic: str, count: int) -> None:
    async with asyncio.timeout(TIMEOUT):
        while await _committed(settings, group_id, topic) < count:
            await asyncio.sleep(0.1)


async def test_the_inbox_hub_commits_at_most_every_commit_interval_and_on_close(tansu: TansuServer) -> None:
    url = _url(tansu)
    settings = KafkaSettings.from_url(url)
    async with Bus.from_url(url) as bus, bus.inbox("dev-1", broadcasts=False) as inbox:
        for n in range(2):
            await bus.send("pm", "dev-1", f"m{n}")
            delivery = await inbox.get(TIMEOUT)
            await delivery.ack()
            if n == 0:  # the first settled floor is committed at once ...
                await _until_committed(settings, settings.inbox_group, settings.inbox_topic, 1)
        await asyncio.sleep(HELD)  # ... the next one waits for the interval
        assert await _committed(settings, settings.inbox_group, settings.inbox_topic) == 1
    # ... or for close.
    assert await _committed(settings, settings.inbox_group, settings.inbox_topic) == 2


async def test_a_group_member_commits_at_most_every_commit_interval_and_on_close(tansu: TansuServer) -> None:
    url = _url(tansu)
    settings = KafkaSettings.from_url(url)
    got: asyncio.Queue[Delivery] = asyncio.Queue()
    async with Bus.from_url(f"{url}&join_wait=true") as bus:
        await bus.subscribe(subjects.direct("dev-1"), got.put, group="audit")
        backend = bus.backend
        assert isinstance(backend, KafkaBackend)
        [group_id] = [sub.kafka_group_id for sub in backend._subscriptions if sub.kafka_group_id]
        for n in range(2):
            await bus.send("pm", "dev-1", f"m{n}")
            await asyncio.wait_for(got.get(), TIMEOUT)  # acked by returning
            if n == 0:
                await _until_committed(settings, group_id, settings.topic, 1)
        await asyncio.sleep(HELD)
        assert await _committed(settings, group_id, settings.topic) == 1
    assert await _committed(settings, group_id, settings.topic) == 2


def test_commit_interval_ms_is_checked() -> None:
    assert KafkaSettings.from_url("kafka://127.0.0.1:9092?commit_interval_ms=0").commit_interval_ms == 0
    with pytest.raises(ConfigError, match="commit_interval_ms"):
        KafkaSettings.from_url("kafka://127.0.0.1:9092?commit_interval_ms=-1")


async def test_connecting_to_tansu_with_a_zero_fetch_wait_is_refused_clearly(tansu: TansuServer) -> None:
    # tansu's fetch reads nothing with max_wait 0: every subscription would stay empty without a word.
    with pytest.raises(ConfigError, match="fetch_max_wait_ms=0 on tansu"):
        await Bus.from_url(f"{_url(tansu)}&fetch_max_wait_ms=0").start()
