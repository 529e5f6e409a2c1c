"""Inbox broadcasts per Bus on a real Redis: ephemeral by default, durable per host with host_id."""

from __future__ import annotations

import uuid

import pytest

from squadbus.core.bus import Bus
from squadbus.core.errors import ConfigError, ReceiveTimeout
from squadbus.core.settings import Settings

pytestmark = pytest.mark.redis


async def _open_and_close(url: str, agent: str, host_id: str | None) -> None:
    async with Bus.from_url(url, host_id=host_id) as bus, bus.inbox(agent):
        pass


async def test_a_host_with_an_id_gets_the_broadcasts_sent_while_it_was_down(redis_url: str) -> None:
    agent, host = f"agent-{uuid.uuid4().hex[:8]}", f"host-{uuid.uuid4().hex[:8]}"
    await _open_and_close(redis_url, agent, host)  # the host's group exists from here on
    async with Bus.from_url(redis_url) as other:
        sent = await other.broadcast("pm", "sent while the host was down")
    async with Bus.from_url(redis_url, host_id=host) as bus, bus.inbox(agent) as inbox:
        assert bus.broadcast_hub.group == f"inbox-host-{host}"
        delivery = await inbox.get(10)
        assert delivery.message.id == sent.id
        await delivery.ack()


async def test_without_a_host_id_an_inbox_hears_broadcasts_while_open(redis_url: str) -> None:
    agent = f"agent-{uuid.uuid4().hex[:8]}"
    await _open_and_close(redis_url, agent, None)
    async with Bus.from_url(redis_url) as other:
        await other.broadcast("pm", "sent while nobody listened")
    async with Bus.from_url(redis_url) as bus, bus.inbox(agent) as inbox:
        assert bus.broadcast_hub.group is None
        with pytest.raises(ReceiveTimeout):
            await inbox.get(0.5)
        sent = await bus.broadcast("pm", "sent while open")
        delivery = await inbox.get(10)
        assert delivery.message.id == sent.id


def test_host_id_comes_from_the_environment() -> None:
    settings = Settings.from_env({"SQUADBUS_HOST_ID": "worker-1", "SQUADBUS_DATA_DIR": "/tmp/x"})
    assert Bus.from_settings(settings).host_id == "worker-1"
    with pytest.raises(ConfigError, match="host_id"):
        Bus.from_url("memory://", host_id="bad id")
