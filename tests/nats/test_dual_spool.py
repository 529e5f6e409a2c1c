"""dual:// with secondary=spool against a real nats-server that goes away: the primary's ack decides
success, the copy waits in the local spool and lands in order once the secondary is back (issue 17, item 4)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from squadbus.backends.dual import DualBackend
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.testing.servers.nats import NatsServer

pytestmark = pytest.mark.nats


async def _spool_empty(bus: Bus, timeout: float) -> None:
    backend = bus.backend
    assert isinstance(backend, DualBackend)
    async with asyncio.timeout(timeout):
        while backend.figures()["dual_spool_depth"]:
            await asyncio.sleep(0.05)


async def _on_nats(url: str, executions: list[uuid.UUID]) -> dict[uuid.UUID, list[uuid.UUID]]:
    async with Bus.from_url(url) as nats:
        return {e: [m.id async for _, m in nats.replay(e)] for e in executions}


async def test_secondary_down_5s_under_steady_sends_loses_nothing_and_keeps_order(tmp_path: Path) -> None:
    with NatsServer(tmp_path / "nats") as server:
        url = f"dual://memory://|{server.url}?publish_timeout=1|secondary=spool&spool={tmp_path / 'spool.db'}"
        executions = [uuid.uuid4() for _ in range(3)]
        sent: list[Message] = []
        async with Bus.from_url(url) as bus:
            loop = asyncio.get_running_loop()

            async def produce(seconds: float) -> None:  # ~100 msgs/s, every send must succeed
                end = loop.time() + seconds
                while loop.time() < end:
                    execution = executions[len(sent) % len(executions)]
                    sent.append(await bus.send("pm", "dev-1", f"m{len(sent)}", task_execution_id=execution))
                    await asyncio.sleep(0.01)

            await produce(1.0)
            server.stop()
            await produce(5.0)
            backend = bus.backend
            assert isinstance(backend, DualBackend)
            assert backend.figures()["dual_spool_depth"] > 0, "sends during the outage were spooled"
            server.start()
            await produce(1.0)
            await _spool_empty(bus, 60)
            assert backend.figures()["dual_spool_refused"] == 0
        stored = await _on_nats(server.url, executions)
    for execution in executions:
        assert stored[execution] == [m.id for m in sent if m.task_execution_id == execution], (
            "every message on the secondary once, in send order")


async def test_a_restarted_process_sends_what_it_spooled_before(tmp_path: Path) -> None:
    spool = tmp_path / "spool.db"
    execution = uuid.uuid4()
    with NatsServer(tmp_path / "nats") as server:
        url = f"dual://memory://|{server.url}?publish_timeout=1|secondary=spool&spool={spool}"
        async with Bus.from_url(url) as bus:
            server.stop()
            sent = [await bus.send("pm", "dev-1", str(i), task_execution_id=execution) for i in range(10)]
            backend = bus.backend
            assert isinstance(backend, DualBackend)
            assert backend.figures()["dual_spool_depth"] == 10
        # The process is gone with 10 messages spooled; the secondary comes back; the next run sends them.
        server.start()
        async with Bus.from_url(url) as bus:
            await _spool_empty(bus, 30)
        stored = await _on_nats(server.url, [execution])
    assert stored[execution] == [m.id for m in sent]
