"""The first connect is quiet and bounded; a connection lost after it is still logged and rejoined."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from squadbus.core.bus import Bus
from squadbus.testing.conformance import eventually
from squadbus.testing.servers.nats import NatsServer

pytestmark = pytest.mark.nats


async def test_a_lost_connection_is_logged_and_reconnects_forever(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="squadbus.backends.nats")
    with NatsServer(tmp_path / "nats") as server:
        async with Bus.from_url(f"{server.url}?connect_timeout=1") as bus:
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
            server.kill9()
            await eventually(
                lambda: any("disconnected from NATS; reconnecting" in r.getMessage() for r in caplog.records),
                10, "the disconnect warning",
            )
            # More failed attempts than the first connect allows: the reconnect must not give up.
            await eventually(
                lambda: sum("nats connection error" in r.getMessage() for r in caplog.records) >= 3,
                10, "several failed reconnect attempts logged",
            )
            server.start()
            await eventually(
                lambda: any("reconnected to NATS" in r.getMessage() for r in caplog.records), 20, "the reconnect",
            )
            await bus.send("pm", "dev-1", "after the restart")
