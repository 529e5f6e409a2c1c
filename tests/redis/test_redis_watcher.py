"""One blocking XREAD per Redis backend for broadcasts, subscriptions without a group and waiting
requests (backends/redis/watcher.py; issue 15's bound of 8 connections per Bus)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from squadbus.backends.redis import RedisBackend
from squadbus.backends.redis.settings import RedisSettings
from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.testing.servers.redis import RedisServer

pytestmark = pytest.mark.redis

TIMEOUT = 20.0
DOMAINS = ("dev", "marketing", "admin", "sales", "support")


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(port=redis_server.port)
    yield client
    await client.aclose()


async def squadbus_clients(raw: aioredis.Redis) -> int:
    listed = await raw.execute_command("CLIENT", "LIST")
    text = listed.decode() if isinstance(listed, bytes) else str(listed)
    return sum(1 for line in text.splitlines() if "name=squadbus" in line)


async def test_broadcast_subjects_and_waiting_requests_share_one_connection(
    redis_url: str, raw: aioredis.Redis
) -> None:
    """A host with default inboxes in five domains and 30 requests waiting at once: before the
    watcher every broadcast subject and every waiting request held a connection of its own (36+)."""
    before = await squadbus_clients(raw)
    backend = RedisBackend(RedisSettings.from_url(redis_url))
    async with Bus(backend) as bus:
        agents = [f"{DOMAINS[i % 5]}-{uuid.uuid4().hex[:8]}" for i in range(100)]
        inboxes = [bus.inbox(a, domains=(a.split("-")[0],)) for a in agents]
        await asyncio.gather(*(inbox.open() for inbox in inboxes))
        arrived: list[Message] = []
        gate = asyncio.Event()

        async def respond(delivery: Delivery) -> None:
            arrived.append(delivery.message)
            await gate.wait()
            await bus.reply(delivery.message, "responder", f"re: {delivery.message.content}")

        await bus.subscribe("agent.message.responder", respond, group="responders",
                            options=ConsumerOptions(max_in_flight=30))
        requests = [asyncio.create_task(bus.request("asker", "responder", f"q{i}", timeout=TIMEOUT))
                    for i in range(30)]
        async with asyncio.timeout(TIMEOUT):
            while len(arrived) < 30:
                await asyncio.sleep(0.01)
        held = await squadbus_clients(raw) - before  # every request is waiting for its reply now
        gate.set()
        answers = await asyncio.gather(*requests)
        assert sorted(a.content for a in answers) == sorted(f"re: q{i}" for i in range(30))

        squad = await bus.broadcast("pm-dev", "all hands")
        dev = await bus.broadcast("pm-dev", "dev only", domain="dev")
        for inbox, agent in zip(inboxes, agents, strict=True):
            got = [await inbox.get(TIMEOUT)]
            if agent.startswith("dev-"):
                got.append(await inbox.get(TIMEOUT))
            assert {d.message.id for d in got} == ({squad.id, dev.id} if agent.startswith("dev-") else {squad.id})
            for delivery in got:
                await delivery.ack()
        assert bus.broadcast_hub.subscriptions == 6
        assert held <= 8, f"6 broadcast subjects, 100 inboxes and 30 waiting requests hold {held} connections"
        assert backend.stats()["subscriptions"] == 7  # the broadcast subjects and the responders' group


async def test_a_subscription_added_while_the_read_is_blocked_is_read_at_once(redis_server: RedisServer) -> None:
    """With a 60 s block, a subscription made while the shared read waits gets its first message
    long before that read would end on its own (the wake stream ends it)."""
    url = f"{redis_server.url}?prefix=t{uuid.uuid4().hex[:10]}&block=60"
    async with Bus(RedisBackend(RedisSettings.from_url(url))) as bus:
        first: asyncio.Queue[Message] = asyncio.Queue()
        second: asyncio.Queue[Message] = asyncio.Queue()

        def to(queue: asyncio.Queue[Message]) -> Callable[[Delivery], Awaitable[None]]:
            async def handler(delivery: Delivery) -> None:
                queue.put_nowait(delivery.message)
            return handler

        await bus.subscribe(subjects.domain("dev"), to(first))
        sent = await bus.broadcast("pm", "one", domain="dev")
        assert (await asyncio.wait_for(first.get(), TIMEOUT)).id == sent.id  # the read is blocked now
        await asyncio.sleep(0.2)
        await bus.subscribe(subjects.domain("sales"), to(second))
        later = await bus.broadcast("pm", "two", domain="sales")
        assert (await asyncio.wait_for(second.get(), TIMEOUT)).id == later.id


async def test_a_slow_subscription_gets_every_message_in_order_while_others_go_on(redis_url: str) -> None:
    """A subscription without room is left out of the shared read until it has room again; the other
    watched streams are not held back, and nothing of the paused one is lost or reordered."""
    async with Bus(RedisBackend(RedisSettings.from_url(redis_url))) as bus:
        slow_got: list[str] = []
        fast_got: list[str] = []
        gate = asyncio.Event()

        async def slow(delivery: Delivery) -> None:
            await gate.wait()
            slow_got.append(delivery.message.content)

        async def fast(delivery: Delivery) -> None:
            fast_got.append(delivery.message.content)

        await bus.subscribe(subjects.domain("dev"), slow, options=ConsumerOptions(batch_size=4))
        await bus.subscribe(subjects.domain("sales"), fast)
        for i in range(40):
            await bus.broadcast("pm", f"d{i}", domain="dev")
            await bus.broadcast("pm", f"s{i}", domain="sales")
        async with asyncio.timeout(TIMEOUT):
            while len(fast_got) < 40:
                await asyncio.sleep(0.01)
        assert fast_got == [f"s{i}" for i in range(40)]
        assert len(slow_got) == 0
        gate.set()
        async with asyncio.timeout(TIMEOUT):
            while len(slow_got) < 40:
                await asyncio.sleep(0.01)
        assert slow_got == [f"d{i}" for i in range(40)]


async def test_bursts_of_concurrent_commands_do_not_grow_the_connections(redis_url: str, raw: aioredis.Redis) -> None:
    """500 concurrent sends while 300 inboxes open and 50 requests wait: commands that do not block
    share a few connections (before: the pool grew to the burst's concurrency and kept it)."""
    before = await squadbus_clients(raw)
    backend = RedisBackend(RedisSettings.from_url(redis_url))
    async with Bus(backend) as bus:
        agents = [f"dev-{uuid.uuid4().hex[:8]}" for _ in range(300)]
        inboxes = [bus.inbox(a, domains=("dev",)) for a in agents]
        gate = asyncio.Event()

        async def respond(delivery: Delivery) -> None:
            await gate.wait()
            await bus.reply(delivery.message, "responder", "ok")

        await bus.subscribe("agent.message.responder", respond, group="responders",
                            options=ConsumerOptions(max_in_flight=50))
        requests = [asyncio.create_task(bus.request("asker", "responder", "q", timeout=TIMEOUT)) for _ in range(50)]
        await asyncio.gather(*(inbox.open() for inbox in inboxes),
                             *(bus.send("pm", agents[i % 300], f"m{i}") for i in range(500)))
        gate.set()
        assert len(await asyncio.gather(*requests)) == 50
        peak = await squadbus_clients(raw) - before  # a pool keeps what a burst made it open
        for inbox in inboxes[:10]:
            got = await inbox.get(TIMEOUT)
            assert got.message.content.startswith("m")
            await got.ack()
        assert peak <= 8, f"a burst of sends, opens and requests left {peak} connections"
