"""Redis inboxes multiplexed per backend (backends/redis/inboxes.py, docs/design/inboxes.md R2):
lost bells, a killed host, entries left by the per-inbox groups of earlier versions, nack order."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from squadbus.backends.redis import RedisBackend
from squadbus.backends.redis.layout import KeyLayout
from squadbus.backends.redis.settings import RedisSettings
from squadbus.core import envelope, subjects
from squadbus.core.backend import ConsumerOptions, Delivery, durable_name
from squadbus.core.bus import Bus
from squadbus.core.dispatch import DLQ_GROUP
from squadbus.core.errors import ReceiveTimeout
from squadbus.testing import inbox_host
from squadbus.testing.conformance import eventually
from squadbus.testing.servers.redis import RedisServer

pytestmark = pytest.mark.redis

TIMEOUT = 20.0


def _agent() -> str:
    return f"agent-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(port=redis_server.port)
    yield client
    await client.aclose()


def _keys(url: str, agent: str) -> tuple[str, str]:
    """The agent's subject stream and its inbox group's Redis name."""
    settings = RedisSettings.from_url(url)
    subject = subjects.direct(agent)
    return KeyLayout(settings.prefix, settings.partitions).subject_stream(subject), durable_name(f"inbox-{agent}",
                                                                                                subject)


async def test_a_message_whose_bell_never_rang_is_delivered_by_the_sweep(
    redis_url: str, raw: aioredis.Redis
) -> None:
    agent = _agent()
    stream, _ = _keys(redis_url, agent)
    async with Bus.from_url(redis_url + "&claim_interval=0.2") as bus, bus.inbox(agent, broadcasts=False) as inbox:
        # Written as a publisher without the bell would (an older version): no PUBLISH.
        quiet = envelope.build(subject=subjects.direct(agent), sender_id="pm", recipient_id=agent, content="quiet")
        await raw.xadd(stream, {"m": envelope.encode(quiet)})
        delivery = await inbox.get(TIMEOUT)
        assert delivery.message.id == quiet.id
        await delivery.ack()


async def test_bells_lost_while_the_pubsub_connection_was_killed_are_caught_up(
    redis_url: str, raw: aioredis.Redis
) -> None:
    agent = _agent()
    # A sweep far away: only the bell connection's recovery can deliver within the test.
    async with Bus.from_url(redis_url + "&claim_interval=600") as bus, bus.inbox(agent, broadcasts=False) as inbox:
        first = await bus.send("pm", agent, "before")
        assert (await inbox.get(TIMEOUT)).message.id == first.id
        await inbox._current.ack()  # type: ignore[union-attr]
        killed = await raw.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert killed >= 1
        lost = await bus.send("pm", agent, "while the bell connection was down")
        delivery = await inbox.get(TIMEOUT)
        assert delivery.message.id == lost.id
        await delivery.ack()
        await eventually(lambda: bus.backend._inboxes._bells.connected,  # type: ignore[attr-defined]
                         TIMEOUT, "the bell connection to come back")
        after = await bus.send("pm", agent, "after")
        delivery = await inbox.get(TIMEOUT)
        assert delivery.message.id == after.id
        await delivery.ack()


async def test_nack_comes_back_with_attempt_plus_one_before_later_messages(redis_url: str) -> None:
    agent = _agent()
    async with Bus.from_url(redis_url) as bus:
        sent = [await bus.send("pm", agent, f"m{i}") for i in range(3)]
        async with bus.inbox(agent, broadcasts=False) as inbox:
            got: list[tuple[uuid.UUID, int]] = []
            for _ in range(5):
                delivery = await inbox.get(TIMEOUT)
                got.append((delivery.message.id, delivery.attempt))
                if delivery.message.id == sent[0].id and delivery.attempt < 3:
                    await delivery.nack(0.1)
                else:
                    await delivery.ack()
    assert got == [(sent[0].id, 1), (sent[0].id, 2), (sent[0].id, 3), (sent[1].id, 1), (sent[2].id, 1)]


async def test_entries_left_in_a_per_inbox_group_of_an_earlier_version_are_delivered(
    redis_url: str, raw: aioredis.Redis
) -> None:
    agent = _agent()
    stream, group = _keys(redis_url, agent)
    async with Bus.from_url(redis_url) as bus:
        sent = [await bus.send("pm", agent, f"m{i}") for i in range(4)]
        # What today's per-inbox subscription did: its group on the agent's stream from 0, then a
        # member that read three entries and died without acking them.
        await raw.xgroup_create(stream, group, id="0", mkstream=True)
        read = await raw.xreadgroup(group, "old-host-1234-abcd", {stream: ">"}, count=3)
        assert len(read[0][1]) == 3
        options = ConsumerOptions(ack_wait=1.0)
        async with bus.inbox(agent, broadcasts=False, options=options) as inbox:
            got = []
            for _ in range(4):
                delivery = await inbox.get(TIMEOUT)
                got.append((delivery.message.id, delivery.attempt))
                await delivery.ack()
    assert [message_id for message_id, _ in got] == [m.id for m in sent], "in order, the left ones first"
    assert [attempt for _, attempt in got] == [2, 2, 2, 1]
    await eventually_pending_is(raw, stream, group, 0)


async def test_a_subscription_of_an_earlier_version_closed_hands_its_entries_to_the_inbox(redis_url: str) -> None:
    agent = _agent()
    async with Bus.from_url(redis_url) as bus:
        sent = [await bus.send("pm", agent, f"m{i}") for i in range(3)]
        held: list[Delivery] = []
        stop = asyncio.Event()

        async def holding(delivery: Delivery) -> None:
            held.append(delivery)
            await stop.wait()  # returns unsettled: nacked, so still pending in the old group

        # The path inboxes took before: a group subscription on the direct subject, one at a time.
        old = await bus.backend.subscribe(subjects.direct(agent), holding, group=f"inbox-{agent}",
                                          options=ConsumerOptions(backoff_base=30, backoff_max=30))
        await eventually(lambda: len(held) == 1, TIMEOUT, "the old subscription to hold one")
        stop.set()
        await old.close()  # gives back what it holds and what it read ahead
        async with bus.inbox(agent, broadcasts=False) as inbox:
            got = []
            for _ in range(3):
                delivery = await inbox.get(TIMEOUT)
                got.append(delivery.message.id)
                await delivery.ack()
    assert got == [m.id for m in sent]


async def eventually_pending_is(raw: aioredis.Redis, stream: str, group: str, count: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while True:
        summary = await raw.xpending(stream, group)
        if summary["pending"] == count or loop.time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert summary["pending"] == count


async def test_kill9_of_a_host_with_unacked_deliveries_they_reach_the_agent_opened_elsewhere(
    redis_url: str, raw: aioredis.Redis, tmp_path: Path
) -> None:
    agents = [_agent() for _ in range(5)]
    log = tmp_path / "host.log"
    ack_wait = 1.0
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", inbox_host.MODULE, redis_url, str(log), str(ack_wait), "hold", *agents)
    try:
        await eventually(lambda: log.exists() and "ready" in log.read_text().splitlines(), TIMEOUT * 3,
                         "the host to open its inboxes")
        async with Bus.from_url(redis_url) as bus:
            sent = {a: [(await bus.send("pm", a, f"m{i}")).id for i in range(3)] for a in agents}
            await eventually(lambda: len(log.read_text().splitlines()) == 1 + len(agents), TIMEOUT,
                             "the host to hold one delivery per agent")
            for agent in agents:
                stream, group = _keys(redis_url, agent)
                await eventually_pending_is(raw, stream, group, 1)  # one at a time: nothing read ahead
            proc.kill()
            await proc.wait()
            options = ConsumerOptions(ack_wait=ack_wait)

            async def reopen(agent: str) -> list[tuple[uuid.UUID, int]]:
                async with bus.inbox(agent, broadcasts=False, options=options) as inbox:
                    got = []
                    for _ in range(3):
                        delivery = await inbox.get(TIMEOUT)
                        got.append((delivery.message.id, delivery.attempt))
                        await delivery.ack()
                    with pytest.raises(ReceiveTimeout):
                        await inbox.get(0.3)
                    return got

            results = await asyncio.gather(*(reopen(a) for a in agents))
        for agent, got in zip(agents, results, strict=True):
            assert [message_id for message_id, _ in got] == sent[agent]
            assert [attempt for _, attempt in got] == [2, 1, 1]
            stream, group = _keys(redis_url, agent)
            await eventually_pending_is(raw, stream, group, 0)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_second_open_in_the_same_bus_waits_for_the_first_to_close(redis_url: str) -> None:
    agent = _agent()
    async with Bus.from_url(redis_url) as bus:
        first = await bus.inbox(agent, broadcasts=False).open()
        second = await bus.inbox(agent, broadcasts=False).open()
        one = await bus.send("pm", agent, "one")
        delivery = await first.get(TIMEOUT)
        assert delivery.message.id == one.id
        with pytest.raises(ReceiveTimeout):
            await second.get(0.3)
        await first.close()  # closed holding it: given back, to the second
        again = await second.get(TIMEOUT)
        assert (again.message.id, again.attempt) == (one.id, 2)
        await again.ack()
        await second.close()


async def test_a_malformed_entry_is_dead_lettered_and_the_next_one_delivered(
    redis_url: str, raw: aioredis.Redis
) -> None:
    agent = _agent()
    stream, _ = _keys(redis_url, agent)
    async with Bus.from_url(redis_url + "&claim_interval=0.2") as bus:
        dead: list[Delivery] = []

        async def dlq(delivery: Delivery) -> None:
            dead.append(delivery)

        await bus.subscribe(subjects.dead_letter(f"inbox-{agent}"), dlq, group="dlq-reader")
        async with bus.inbox(agent, broadcasts=False) as inbox:
            await raw.xadd(stream, {"m": b"not an envelope"})
            good = await bus.send("pm", agent, "good")
            delivery = await inbox.get(TIMEOUT)
            assert delivery.message.id == good.id
            await delivery.ack()
        await eventually(lambda: len(dead) == 1, TIMEOUT, "the malformed entry's dead letter")
        assert dead[0].message.headers[DLQ_GROUP] == f"inbox-{agent}"


async def test_many_inboxes_hold_few_redis_connections(redis_url: str, raw: aioredis.Redis) -> None:
    async def clients() -> int:
        listed = await raw.execute_command("CLIENT", "LIST")
        text = listed.decode() if isinstance(listed, bytes) else str(listed)
        return sum(1 for line in text.splitlines() if "name=squadbus" in line)

    before = await clients()
    backend = RedisBackend(RedisSettings.from_url(redis_url))
    async with Bus(backend) as bus:
        agents = [_agent() for _ in range(500)]
        inboxes = [bus.inbox(a, broadcasts=False) for a in agents]
        for first in range(0, len(inboxes), 100):
            await asyncio.gather(*(inbox.open() for inbox in inboxes[first:first + 100]))
        sent = await asyncio.gather(*(bus.send("pm", a, "hi") for a in agents))
        got = await asyncio.gather(*(inbox.get(TIMEOUT) for inbox in inboxes))
        assert [d.message.id for d in got] == [m.id for m in sent]
        for delivery in got:
            await delivery.ack()
        held = await clients() - before
        assert held <= 8, f"500 inboxes hold {held} Redis connections"
        assert backend.stats()["inboxes_open"] == 500


async def test_two_processes_opening_one_agent_one_is_served_the_other_takes_over_when_it_closes(
    redis_url: str,
) -> None:
    agent = _agent()
    url = redis_url + "&claim_interval=0.2"
    async with Bus.from_url(url) as one, Bus.from_url(url) as two:  # two backend instances, as two processes
        first = await one.inbox(agent, broadcasts=False).open()
        second = await two.inbox(agent, broadcasts=False).open()
        sent = [await one.send("pm", agent, f"m{i}") for i in range(2)]
        held = await first.get(TIMEOUT)
        assert held.message.id == sent[0].id
        with pytest.raises(ReceiveTimeout):
            await second.get(0.6)  # several sweeps: the first holds the lease
        await first.close()  # closed holding m0: given back, lease released
        got = []
        for _ in range(2):
            delivery = await second.get(TIMEOUT)
            got.append((delivery.message.id, delivery.attempt))
            await delivery.ack()
        assert got == [(sent[0].id, 2), (sent[1].id, 1)]
        await second.close()


async def test_inboxes_go_on_after_redis_crashed_and_came_back_empty() -> None:
    server = RedisServer("fast")  # no persistence: streams, groups and leases are gone after the restart
    server.start()
    try:
        agents = [_agent() for _ in range(3)]
        async with Bus.from_url(f"{server.url}?publish_timeout=10&claim_interval=0.3") as bus:
            inboxes = [await bus.inbox(a, broadcasts=False).open() for a in agents]
            for agent, inbox in zip(agents, inboxes, strict=True):
                before = await bus.send("pm", agent, "before")
                delivery = await inbox.get(TIMEOUT)
                assert delivery.message.id == before.id
                await delivery.ack()
            await asyncio.to_thread(server.restart, crash=True, down_for=0.5)
            after = {a: (await bus.send("pm", a, "after")).id for a in agents}
            for agent, inbox in zip(agents, inboxes, strict=True):
                delivery = await inbox.get(TIMEOUT)
                assert delivery.message.id == after[agent]
                await delivery.ack()
            for inbox in inboxes:
                await inbox.close()
    finally:
        server.cleanup()
