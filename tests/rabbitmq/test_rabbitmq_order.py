"""Per-execution order across two members of one group: ``single_active_consumer=true`` gives a group's
queue one active member at a time (the other stands by and takes over when it leaves), so an
execution's messages are handled in publish order; a member whose URL disagrees is refused."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import pytest

from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus
from squadbus.core.errors import ConfigError
from squadbus.testing.conformance import eventually

pytestmark = pytest.mark.rabbitmq


async def test_one_member_at_a_time_keeps_each_execution_in_order_and_the_standby_takes_over(
    rabbitmq_url: str,
) -> None:
    url = f"{rabbitmq_url}&single_active_consumer=true"
    agent, group = f"a-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    executions = [uuid.uuid4(), uuid.uuid4()]
    handled: list[tuple[str, uuid.UUID | None, str]] = []

    def member(name: str) -> Callable[[Delivery], Awaitable[None]]:
        async def handle(delivery: Delivery) -> None:
            await asyncio.sleep(0.002)
            handled.append((name, delivery.message.task_execution_id, delivery.message.content))
        return handle

    options = ConsumerOptions(max_in_flight=1)
    async with Bus.from_url(url) as first, Bus.from_url(url) as second, Bus.from_url(url) as producer:
        sub = await first.subscribe(f"agent.message.{agent}", member("first"), group=group, options=options)
        await second.subscribe(f"agent.message.{agent}", member("second"), group=group, options=options)
        sent = [await producer.send("pm", agent, f"m{i}", task_execution_id=executions[i % 2]) for i in range(30)]
        await eventually(lambda: len(handled) >= len(sent), 20, "every message")
        assert {name for name, _, _ in handled} == {"first"}, "the standby got nothing while the first was active"
        for execution in executions:
            assert [c for _, e, c in handled if e == execution] == [m.content for m in sent
                                                                     if m.task_execution_id == execution]
        await sub.close()
        later = [await producer.send("pm", agent, f"later{i}", task_execution_id=executions[0]) for i in range(5)]
        await eventually(lambda: len(handled) >= len(sent) + len(later), 20, "the messages after the switch")
        assert handled[len(sent):] == [("second", executions[0], m.content) for m in later]


async def test_members_must_agree_on_single_active_consumer(rabbitmq_url: str) -> None:
    agent, group = f"a-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    async with Bus.from_url(rabbitmq_url) as plain, Bus.from_url(f"{rabbitmq_url}&single_active_consumer=true") as sac:
        await plain.subscribe(f"agent.message.{agent}", _noop, group=group)
        with pytest.raises(ConfigError, match="single_active_consumer"):
            await sac.subscribe(f"agent.message.{agent}", _noop, group=group)


async def _noop(delivery: Delivery) -> None:
    return None
