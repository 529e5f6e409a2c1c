"""A NATS server that stalls: as the secondary of dual:// (reported as "not confirmed", a
BackendTimeout: the copy may well be stored, not as "not stored"), and while a group is joined."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid

import pytest

from squadbus.core.backend import Delivery
from squadbus.core.bus import Bus
from squadbus.core.errors import BackendTimeout
from squadbus.testing.servers.nats import NatsServer
from squadbus.testing.servers.process import freeze

pytestmark = pytest.mark.nats


async def test_a_stopped_secondary_is_reported_as_not_confirmed_and_the_copy_lands(nats_server: NatsServer) -> None:
    assert nats_server.proc is not None
    pid = nats_server.proc.pid
    url = f"dual://memory://|{nats_server.url}?publish_timeout=1"
    execution = uuid.uuid4()
    async with Bus.from_url(url) as bus:
        first = await bus.send("pm", "dev-1", "before", task_execution_id=execution)
        freeze(pid)
        try:
            with pytest.raises(BackendTimeout, match="not confirmed by") as caught:
                await bus.send("pm", "dev-1", "while stopped", task_execution_id=execution)
            assert "but not in" not in str(caught.value)
            assert "retry with the same id" in str(caught.value)
        finally:
            os.kill(pid, signal.SIGCONT)
        again = await bus.send("pm", "dev-1", "after", task_execution_id=execution)
    async with Bus.from_url(nats_server.url) as nats:
        stored = [m.content async for _, m in nats.replay(execution)]
    assert stored[0] == first.content and stored[-1] == again.content


async def test_joining_a_group_survives_a_server_that_stalls_past_one_api_timeout(nats_server: NatsServer) -> None:
    """A consumer create that takes longer than one JetStream API timeout (a busy R3 cluster, a leader
    election; seen in CI) is asked again within the subscribe's budget instead of failing the subscribe."""
    assert nats_server.proc is not None
    pid = nats_server.proc.pid
    agent = f"agent-{uuid.uuid4().hex[:8]}"
    async with Bus.from_url(f"{nats_server.url}?connect_timeout=1") as bus:
        got: list[str] = []

        async def keep(delivery: Delivery) -> None:
            got.append(delivery.message.content)

        loop = asyncio.get_running_loop()
        freeze(pid)
        resume = loop.call_later(1.5, os.kill, pid, signal.SIGCONT)
        try:
            await bus.subscribe(f"agent.message.{agent}", keep, group=f"g-{uuid.uuid4().hex[:8]}")
        finally:
            resume.cancel()
            os.kill(pid, signal.SIGCONT)
        await bus.send("pm", agent, "hello")
        for _ in range(200):
            if got:
                break
            await asyncio.sleep(0.02)
        assert got == ["hello"]
