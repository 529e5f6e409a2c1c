"""A publish whose command reached Redis before the connection failed may be stored: the sender is told
"not confirmed" (BackendTimeout), never "not reachable" (ConnectionLost, which promises it was not stored).
Seen in the fault ledger: 4 sends told ConnectionLost after a broker kill -9 were delivered."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from squadbus.core.bus import Bus
from squadbus.core.errors import BackendTimeout, ConnectionLost
from squadbus.testing.servers.process import freeze
from squadbus.testing.servers.redis import RedisServer

pytestmark = pytest.mark.redis


async def test_a_publish_written_before_the_server_died_is_unconfirmed_not_lost(tmp_path: Path) -> None:
    server = RedisServer("fast", directory=tmp_path)
    server.start()
    try:
        async with Bus.from_url(f"{server.url}?publish_timeout=1.5") as bus:
            await bus.send("pm", "dev-1", "warm-up: the connection is open")
            assert server.proc is not None
            freeze(server.proc.pid)  # the next publish is written, never answered
            sending = asyncio.create_task(bus.send("pm", "dev-1", "written, then the server dies"))
            await asyncio.sleep(0.3)
            server.kill9()  # reset: the retries find nothing listening until the timeout
            with pytest.raises(BackendTimeout, match="may be stored") as caught:
                await sending
            assert not isinstance(caught.value, ConnectionLost)
            with pytest.raises(ConnectionLost):  # never written: it is known not to be stored
                await bus.send("pm", "dev-1", "nothing listening")
    finally:
        server.cleanup()
