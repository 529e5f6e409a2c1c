"""What one publish call writes on a real Redis: the partition entry's fields (no empty execution field),
one bell per agent per call, and the readers of those entries (replay, group members) unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest

from squadbus.backends.redis import RedisBackend, RedisSettings
from squadbus.backends.redis._driver import PackedCommand, execute_packed
from squadbus.core import envelope, subjects
from squadbus.core.backend import ConsumerOptions, Delivery, StartFrom
from squadbus.core.bus import Bus, QueuedPublish
from squadbus.core.errors import Closed

pytestmark = pytest.mark.redis


def _message(agent: str, text: str, execution: uuid.UUID | None = None) -> envelope.Message:
    return envelope.build(subject=subjects.direct(agent), sender_id="pm", recipient_id=agent, content=text,
                          task_execution_id=execution)


@contextlib.asynccontextmanager
async def _backend(url: str) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend(RedisSettings.from_url(url))
    await backend.connect()
    try:
        yield backend
    finally:
        await backend.close()


async def test_partition_entries_carry_the_execution_only_when_there_is_one(redis_url: str) -> None:
    execution = uuid.uuid4()
    async with _backend(f"{redis_url}&partitions=1") as backend:
        await backend.publish_many([_message("a", "plain"), _message("a", "in an execution", execution)])
        client = backend._client
        assert client is not None
        (entries,) = await execute_packed(client, PackedCommand("XRANGE", backend.layout.partition_stream(0), "-", "+"))
        fields = [raw[::2] for _, raw in entries]
        assert fields == [[b"s", b"m"], [b"s", b"x", b"m"]]
        assert entries[1][1][3] == str(execution).encode()
        replayed = [message.content async for _, message in backend.replay(execution)]
        assert replayed == ["in an execution"]


async def test_one_call_rings_each_agents_bell_once(redis_url: str) -> None:
    async with _backend(redis_url) as backend:
        client = backend._client
        assert client is not None
        pubsub = client.pubsub()
        await pubsub.subscribe(backend.layout.bell("a"), backend.layout.bell("b"))
        for _ in range(2):  # the subscribe confirmations
            assert await pubsub.get_message(timeout=1.0) is not None
        # one Lua call: five messages to a, three to b, one broadcast (no bell)
        messages = [_message("a", f"a{i}") for i in range(5)] + [_message("b", f"b{i}") for i in range(3)]
        messages.append(envelope.build(subject=subjects.BROADCAST, sender_id="pm", content="all"))
        await backend.publish_many(messages)
        rung: list[bytes] = []
        while (event := await pubsub.get_message(timeout=0.3)) is not None:
            rung.append(event["channel"])
        await pubsub.aclose()
        assert sorted(rung) == sorted(backend.layout.bell(agent).encode() for agent in ("a", "b"))


async def test_a_group_reads_entries_written_with_and_without_an_execution(redis_url: str) -> None:
    got: list[str] = []
    done = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        got.append(delivery.message.content)
        if len(got) == 4:
            done.set()

    async with Bus.from_url(redis_url) as bus:
        # a wildcard pattern: the group reads the partition streams
        await bus.subscribe("agent.message.*", handler, group="g", options=ConsumerOptions(start=StartFrom.NEW))
        execution = uuid.uuid4()
        await asyncio.gather(bus.send("pm", "a", "1"), bus.send("pm", "a", "2", task_execution_id=execution),
                             bus.send("pm", "b", "3"), bus.send("pm", "b", "4", task_execution_id=execution))
        await asyncio.wait_for(done.wait(), 10)
    assert sorted(got) == ["1", "2", "3", "4"]


async def test_bus_send_and_publish_await_the_publishers_future_and_fail_the_same_way(redis_url: str) -> None:
    backend = RedisBackend(RedisSettings.from_url(redis_url))
    assert isinstance(backend, QueuedPublish)  # Bus.send awaits enqueue's future, not a coroutine of publish
    await backend.connect()
    try:
        async with Bus(backend, owns_backend=False) as bus:
            sent = await bus.send("pm", "a", "one")
            published = await bus.publish(_message("a", "two"))
            again = await bus.publish(sent)  # a duplicate id: stored once, still a success
            assert again is sent and published.content == "two"
            client = backend._client
            assert client is not None
            entries = await client.xrange(backend.layout.subject_stream(subjects.direct("a")))
            assert [envelope.decode(fields[b"m"]).content for _, fields in entries] == ["one", "two"]
            await backend.close()
            with pytest.raises(Closed):
                await bus.send("pm", "a", "after close")
    finally:
        await backend.close()
