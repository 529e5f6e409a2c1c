"""``profile=fast``: classic group and inbox queues, transient messages, the same log stream; a queue
declared under one profile and opened under the other is refused with a one-line ConfigError."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from squadbus.backends.rabbitmq.settings import RabbitSettings
from squadbus.core.backend import Delivery
from squadbus.core.bus import Bus
from squadbus.core.errors import ConfigError
from squadbus.testing.conformance import eventually
from squadbus.testing.servers.rabbitmq import RabbitServer

pytestmark = pytest.mark.rabbitmq


async def _noop(delivery: Delivery) -> None:
    return None


def _queue_types(server: RabbitServer, namespace: str) -> dict[str, str]:
    listing = server.ctl("list_queues", "name", "type", "--quiet")
    rows = (line.split() for line in listing.splitlines())
    return {row[0]: row[1] for row in rows if len(row) == 2 and row[0].startswith(f"{namespace}.")}


async def test_fast_declares_classic_group_and_inbox_queues_with_the_log_backlog(
    rabbitmq_url: str, rabbitmq_server: RabbitServer,
) -> None:
    namespace = rabbitmq_url.split("namespace=")[1].split("&", maxsplit=1)[0]
    agent, group = f"a-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    got: list[Delivery] = []

    async def handle(delivery: Delivery) -> None:
        got.append(delivery)

    async with Bus.from_url(f"{rabbitmq_url}&profile=fast") as bus:
        before = await bus.send("pm", agent, "sent before the group existed")
        await bus.subscribe(f"agent.message.{agent}", handle, group=group)
        async with bus.inbox(agent, broadcasts=False) as inbox:
            assert (await inbox.get(10)).message.id == before.id, "the inbox got the log's backlog"
        after = await bus.send("pm", agent, "sent after")
        await eventually(lambda: len(got) >= 2, 10, "the group's backlog and the new message")
        assert [d.message.id for d in got] == [before.id, after.id] and got[0].attempt == 1
    types = await asyncio.to_thread(_queue_types, rabbitmq_server, namespace)
    partitions = RabbitSettings.from_url(rabbitmq_url).inbox_partitions
    assert {types[f"{namespace}.inboxes.{p}"] for p in range(partitions)} == {"classic"}
    assert [t for name, t in types.items() if f".group.{group}" in name] == ["classic"]
    assert types[f"{namespace}.log"] == "stream"


@pytest.mark.parametrize(("first", "then"), [("durable", "fast"), ("fast", "durable")])
async def test_a_queue_of_the_other_profile_is_a_config_error(rabbitmq_url: str, first: str, then: str) -> None:
    agent, group = f"a-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    async with Bus.from_url(f"{rabbitmq_url}&profile={first}") as one, \
            Bus.from_url(f"{rabbitmq_url}&profile={then}") as other:
        await one.subscribe(f"agent.message.{agent}", _noop, group=group)
        async with one.inbox(agent, broadcasts=False):
            pass
        with pytest.raises(ConfigError, match=f"profile={then}") as group_error:
            await other.subscribe(f"agent.message.{agent}", _noop, group=group)
        with pytest.raises(ConfigError, match=f"profile={then}") as inbox_error:
            await other.inbox(agent, broadcasts=False).open()
        for error in (group_error, inbox_error):
            assert "\n" not in str(error.value) and "delete the queue to change them" in str(error.value)
        # The refusal closed a channel, not the connection: the other Bus still works.
        await other.send("pm", agent, "still connected")
