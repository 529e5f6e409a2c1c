"""dual:// with a real NATS secondary: a secondary that does not answer in time is reported as
"not confirmed" (a BackendTimeout: the copy may well be stored), not as "not stored"."""

from __future__ import annotations

import os
import signal
import uuid

import pytest

from squadbus.core.bus import Bus
from squadbus.core.errors import BackendTimeout
from squadbus.testing.servers.nats import NatsServer

pytestmark = pytest.mark.nats


async def test_a_stopped_secondary_is_reported_as_not_confirmed_and_the_copy_lands(nats_server: NatsServer) -> None:
    assert nats_server.proc is not None
    pid = nats_server.proc.pid
    url = f"dual://memory://|{nats_server.url}?publish_timeout=1"
    execution = uuid.uuid4()
    async with Bus.from_url(url) as bus:
        first = await bus.send("pm", "dev-1", "before", task_execution_id=execution)
        os.kill(pid, signal.SIGSTOP)
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
