"""NATS inboxes without a JetStream consumer per agent (backends/nats/inboxes.py, docs/design/inboxes.md N2):
lost bells, a killed host, the per-inbox consumers of earlier versions, nack order, two opens, malformed bytes."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.js.client import JetStreamContext

import nats
from squadbus.backends.nats import NatsBackend
from squadbus.backends.nats.inbox_bucket import bucket_name
from squadbus.backends.nats.settings import NatsSettings
from squadbus.core import envelope, subjects
from squadbus.core.backend import ConsumerOptions, Delivery, durable_name
from squadbus.core.bus import Bus
from squadbus.core.dispatch import DLQ_GROUP, DLQ_REASON
from squadbus.core.errors import ReceiveTimeout
from squadbus.testing import inbox_host
from squadbus.testing.conformance import Collector, eventually
from squadbus.testing.servers.nats import NatsServer

pytestmark = pytest.mark.nats

TIMEOUT = 20.0


def _agent() -> str:
    return f"agent-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    client = await nats.connect(nats_url)
    yield client.jetstream()
    await client.close()


async def _consumers(js: JetStreamContext, url: str) -> set[str]:
    stream = NatsSettings.from_url(url).stream
    return {info.name for info in await js.consumers_info(stream)}


async def test_a_message_whose_bell_never_rang_is_delivered_by_the_sweep(nats_url: str, js: JetStreamContext) -> None:
    agent = _agent()
    async with Bus.from_url(nats_url + "?claim_interval=0.2") as bus, bus.inbox(agent, broadcasts=False) as inbox:
        # Stored as a publisher of an earlier version would: no bell.
        quiet = envelope.build(subject=subjects.direct(agent), sender_id="pm", recipient_id=agent, content="quiet")
        await js.publish(quiet.subject, envelope.encode(quiet))
        delivery = await inbox.get(TIMEOUT)
        assert (delivery.message.id, delivery.attempt) == (quiet.id, 1)
        await delivery.ack()


async def test_bells_lost_with_the_agents_subscription_are_caught_up_by_the_sweep(nats_url: str) -> None:
    agent = _agent()
    async with Bus.from_url(nats_url + "?claim_interval=0.3") as bus, bus.inbox(agent, broadcasts=False) as inbox:
        first = await bus.send("pm", agent, "before")
        got = await inbox.get(TIMEOUT)
        assert got.message.id == first.id
        await got.ack()
        hub = bus.backend._inboxes  # type: ignore[attr-defined]
        await hub._agents[agent].bell.unsubscribe()  # the bell is no longer heard
        lost = [await bus.send("pm", agent, f"unheard {i}") for i in range(3)]
        for sent in lost:
            delivery = await inbox.get(TIMEOUT)
            assert (delivery.message.id, delivery.attempt) == (sent.id, 1)
            await delivery.ack()


async def test_nack_comes_back_with_attempt_plus_one_before_later_messages(nats_url: str) -> None:
    agent = _agent()
    options = ConsumerOptions(backoff_base=0.01, backoff_max=0.05, ack_wait=TIMEOUT * 2)
    async with Bus.from_url(nats_url) as bus, bus.inbox(agent, broadcasts=False, options=options) as inbox:
        one, two = await bus.send("pm", agent, "one"), await bus.send("pm", agent, "two")
        seen: list[tuple[uuid.UUID, int]] = []
        for nack in (True, True, False, False):
            delivery = await inbox.get(TIMEOUT)
            seen.append((delivery.message.id, delivery.attempt))
            await (delivery.nack(0.05) if nack else delivery.ack())
        assert seen == [(one.id, 1), (one.id, 2), (one.id, 3), (two.id, 1)]


async def test_a_second_open_elsewhere_waits_until_the_first_closes(nats_url: str) -> None:
    agent = _agent()
    options = ConsumerOptions(ack_wait=TIMEOUT * 2)  # the first holder lives: only its close hands over
    async with Bus.from_url(nats_url) as first_bus, Bus.from_url(nats_url) as second_bus:
        first = await first_bus.inbox(agent, broadcasts=False, options=options).open()
        second = await second_bus.inbox(agent, broadcasts=False, options=options).open()
        sent = [await first_bus.send("pm", agent, f"m{i}") for i in range(2)]
        held = await first.get(TIMEOUT)
        assert held.message.id == sent[0].id
        with pytest.raises(ReceiveTimeout):
            await second.get(1.5)  # the first holds the agent: nothing here, not even the next message
        await first.close()  # gives back what it held
        again = await second.get(TIMEOUT)
        assert (again.message.id, again.attempt) == (sent[0].id, 2)
        await again.ack()
        after = await second.get(TIMEOUT)
        assert (after.message.id, after.attempt) == (sent[1].id, 1)
        await after.ack()
        await second.close()


async def test_kill9_of_a_host_holding_deliveries_they_come_back_when_reopened(
    nats_url: str, js: JetStreamContext, tmp_path: Path
) -> None:
    agents = [_agent() for _ in range(5)]
    log = tmp_path / "host.log"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", inbox_host.MODULE, nats_url, str(log), "1.0", "hold", *agents)
    try:
        await eventually(lambda: log.exists() and "ready" in log.read_text(), TIMEOUT, "the host to open")
        async with Bus.from_url(nats_url) as bus:
            sent = {a: [await bus.send("pm", a, str(i)) for i in range(3)] for a in agents}
            await eventually(lambda: len(log.read_text().splitlines()) >= 1 + len(agents), TIMEOUT,
                             "the host to hold one delivery per agent")
            consumers = await _consumers(js, nats_url)
            assert not any(c.startswith("inbox-agent") for c in consumers), "no JetStream consumer per inbox"
            proc.kill()
            await proc.wait()
            options = ConsumerOptions(ack_wait=1.0)

            async def reopen(agent: str) -> list[tuple[uuid.UUID, int]]:
                async with bus.inbox(agent, broadcasts=False, options=options) as inbox:
                    got = []
                    for _ in range(3):
                        delivery = await inbox.get(TIMEOUT)
                        got.append((delivery.message.id, delivery.attempt))
                        await delivery.ack()
                    return got

            results = await asyncio.gather(*(reopen(a) for a in agents))
        for agent, got in zip(agents, results, strict=True):
            ids = [m.id for m in sent[agent]]
            assert got == [(ids[0], 2), (ids[1], 1), (ids[2], 1)], agent
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_unacked_messages_of_an_earlier_per_inbox_consumer_are_delivered_and_it_is_removed(
    nats_url: str, js: JetStreamContext
) -> None:
    agent = _agent()
    subject = subjects.direct(agent)
    group = f"inbox-{agent}"
    old = durable_name(group, subject)
    async with Bus.from_url(nats_url) as bus:
        sent = [await bus.send("pm", agent, f"m{i}") for i in range(4)]
        backend = bus.backend
        assert isinstance(backend, NatsBackend)
        acked: list[Delivery] = []
        done = asyncio.Event()

        async def earlier_version(delivery: Delivery) -> None:  # acks one, then stops
            if not acked:
                acked.append(delivery)
                await delivery.ack()
                done.set()
            else:
                await delivery.nack(60.0)  # left pending: an earlier version that died mid-work

        # The subscription an inbox was before: a durable consumer of its own.
        sub = await backend.subscribe(subject, earlier_version, group=group, options=ConsumerOptions())
        await asyncio.wait_for(done.wait(), TIMEOUT)
        await sub.close()
        assert old in await _consumers(js, nats_url)
        async with bus.inbox(agent, broadcasts=False) as inbox:
            got = []
            for _ in range(3):
                delivery = await inbox.get(TIMEOUT)
                got.append(delivery.message.id)
                await delivery.ack()
            with pytest.raises(ReceiveTimeout):
                await inbox.get(0.5)
        assert acked[0].message.id == sent[0].id
        assert got == [m.id for m in sent[1:]]
        assert old not in await _consumers(js, nats_url), "the earlier consumer is deleted once taken over"


async def test_malformed_bytes_are_dead_lettered_and_the_agent_goes_on(nats_url: str, js: JetStreamContext) -> None:
    agent = _agent()
    async with Bus.from_url(nats_url) as bus:
        dlq = Collector()
        await bus.subscribe(subjects.dead_letter(f"inbox-{agent}"), dlq, group=f"dlq-{agent}")
        await js.publish(subjects.direct(agent), b"not an envelope")
        fine = await bus.send("pm", agent, "fine")
        async with bus.inbox(agent, broadcasts=False) as inbox:
            delivery = await inbox.get(TIMEOUT)
            assert delivery.message.id == fine.id
            await delivery.ack()
        await eventually(lambda: len(dlq.messages) == 1, TIMEOUT, "the dead letter")
        dead = dlq.messages[0]
        assert dead.headers[DLQ_GROUP] == f"inbox-{agent}"
        assert "malformed" in dead.headers[DLQ_REASON]


async def test_cursors_live_in_a_kv_bucket_and_survive_the_bus(nats_url: str, js: JetStreamContext) -> None:
    agent = _agent()
    async with Bus.from_url(nats_url) as bus:
        sent = [await bus.send("pm", agent, f"m{i}") for i in range(2)]
        async with bus.inbox(agent, broadcasts=False) as inbox:
            first = await inbox.get(TIMEOUT)
            await first.ack()
    kv = await js.key_value(bucket_name(NatsSettings.from_url(nats_url).stream))
    cursor = int((await kv.get(f"c.{agent}")).value.split()[0])  # type: ignore[union-attr]
    assert cursor > 0
    async with Bus.from_url(nats_url) as bus, bus.inbox(agent, broadcasts=False) as inbox:
        second = await inbox.get(TIMEOUT)
        assert (second.message.id, second.attempt) == (sent[1].id, 1)
        await second.ack()


async def test_a_delivery_never_settled_past_max_deliver_is_dead_lettered(nats_url: str, js: JetStreamContext) -> None:
    agent = _agent()
    async with Bus.from_url(nats_url) as bus:
        dlq = Collector()
        await bus.subscribe(subjects.dead_letter(f"inbox-{agent}"), dlq, group=f"dlq-{agent}")
        async with bus.inbox(_agent(), broadcasts=False):
            pass  # the bucket exists once an inbox has opened
        stream = NatsSettings.from_url(nats_url).stream
        stuck = await bus.send("pm", agent, "handed out 7 times, settled never (its hosts kept dying)")
        seq = (await js.get_last_msg(stream, subjects.direct(agent))).seq
        after = await bus.send("pm", agent, "next")
        kv = await js.key_value(bucket_name(stream))
        # As the hosts left it: cursor before it, the message out at its 7th attempt (max_deliver 5 + margin 2).
        await kv.put(f"c.{agent}", f"0 {seq} 7".encode())
        async with bus.inbox(agent, broadcasts=False) as inbox:
            delivery = await inbox.get(TIMEOUT)
            assert (delivery.message.id, delivery.attempt) == (after.id, 1)
            await delivery.ack()
        await eventually(lambda: len(dlq.messages) == 1, TIMEOUT, "the dead letter")
        assert dlq.messages[0].headers["dlq-original-id"] == str(stuck.id)
        assert "never settled" in dlq.messages[0].headers[DLQ_REASON]


async def test_bells_are_heard_again_after_the_server_restarts(tmp_path: Path) -> None:
    with NatsServer(tmp_path / "nats") as server:
        agent = _agent()
        # A sweep far away: only the resubscribed bells (and the read after reconnecting) can deliver in time.
        async with Bus.from_url(server.url + "?claim_interval=600") as bus, \
                bus.inbox(agent, broadcasts=False) as inbox:
            first = await bus.send("pm", agent, "before")
            got = await inbox.get(TIMEOUT)
            assert got.message.id == first.id
            await got.ack()
            server.kill9()
            await asyncio.sleep(0.3)
            server.start()
            later = [await bus.send("pm", agent, f"after {i}") for i in range(3)]
            for sent in later:
                delivery = await inbox.get(TIMEOUT)
                assert (delivery.message.id, delivery.attempt) == (sent.id, 1)
                await delivery.ack()
