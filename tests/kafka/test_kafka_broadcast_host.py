"""Inbox broadcasts per Bus on tansu with broadcasts apart: a host with an id reads the broadcast topic through
two durable groups (squad, domains) and gets what was broadcast while it was down; direct messages still reach
the inbox once, through the inbox topic."""

from __future__ import annotations

import uuid

import pytest

from squadbus.core.bus import Bus
from squadbus.core.errors import ReceiveTimeout
from squadbus.testing.servers.kafka import TansuServer

pytestmark = pytest.mark.kafka

TIMEOUT = 30.0


async def test_a_host_with_an_id_gets_squad_and_domain_broadcasts_sent_while_it_was_down(tansu: TansuServer) -> None:
    tag = uuid.uuid4().hex[:10]
    # join_wait: the host's groups start from their first join; one that closes before it has no position yet
    url = f"{tansu.url}?partitions=2&idempotence=off&topic=t-{tag}&inbox_group=ib-{tag}&join_wait=true"
    agent, host = f"dev-{tag[:6]}", f"host-{tag[:6]}"
    async with Bus.from_url(url, host_id=host) as bus, bus.inbox(agent, domains=("dev",)):
        assert bus.broadcast_hub.subscriptions == 2  # agent.message.broadcast and agent.message.domain.>
    async with Bus.from_url(url) as other:
        squad = await other.broadcast("pm", "sent while the host was down")
        dev = await other.broadcast("pm-dev", "dev, while it was down", domain="dev")
        await other.broadcast("pm-sales", "not for dev", domain="sales")
        direct = await other.send("pm", agent, "just you")
    async with Bus.from_url(url, host_id=host) as bus, bus.inbox(agent, domains=("dev",)) as inbox:
        got = set()
        for _ in range(3):
            delivery = await inbox.get(TIMEOUT)
            got.add(delivery.message.id)
            await delivery.ack()
        assert got == {squad.id, dev.id, direct.id}
        with pytest.raises(ReceiveTimeout):
            await inbox.get(1.0)
