"""An ordered NATS group (``ordered_groups``, pinned_client) keeps an execution's order across a member's close,
cancelled or not: what the closing member held (in its handler or queued in its source) reaches the member
pinned next before any later message of the execution, in send order, against a real nats-server.

After a cancelled close the server redelivered the three naked messages out of order (stream seqs 3 1 2 and 2 3 1
seen on 2.15.1, before m3's 4); the member pinned next holds what it takes over and hands it out sorted
(pinned.py's TakeoverBuffer), which this test guards."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from squadbus.backends.nats import NatsBackend
from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus
from squadbus.testing.conformance import eventually

pytestmark = pytest.mark.nats

ACK_WAIT = 1.5  # the next member is pinned 2 * ACK_WAIT after the closed one's last pull
WAIT = 15.0


def _ordered(url: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}ordered_groups=true"


@pytest.mark.parametrize("close", ["cancelled", "normal"])
async def test_the_next_member_gets_a_closed_members_messages_in_send_order(nats_url: str, close: str) -> None:
    # The first member handles m0 (held) while m1 and m2 wait in its source's queue; it closes (its close
    # cancelled, as by a timeout around Bus.close: the handler is cancelled and m0 naked; or normally: m0
    # finishes and is acked); m3 is sent after. The standby member, pinned next, gets the rest in send order.
    agent, group = f"agent-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    pattern = subjects.direct(agent)
    options = ConsumerOptions(ack_wait=ACK_WAIT)
    execution = uuid.uuid4()
    handling, release = asyncio.Event(), asyncio.Event()
    got: list[uuid.UUID] = []

    async def hold(delivery: Delivery) -> None:
        handling.set()
        await release.wait()
        await delivery.ack()

    async def collect(delivery: Delivery) -> None:
        got.append(delivery.message.id)
        await delivery.ack()

    async with Bus.from_url(_ordered(nats_url)) as bus:
        backend = bus.backend
        assert isinstance(backend, NatsBackend)
        first = await backend.subscribe(pattern, hold, group=group, options=options)
        source = first.source
        sent = [await bus.send("pm", agent, f"m{i}", task_execution_id=execution) for i in range(3)]
        await asyncio.wait_for(handling.wait(), WAIT)  # first is pinned; m0 is handled
        await eventually(lambda: len(source._queue) == 2, WAIT, "m1 and m2 queued in the first member's source")
        standby = await backend.subscribe(pattern, collect, group=group, options=options)
        if close == "cancelled":
            closing = asyncio.create_task(first.close())
            await asyncio.sleep(0.05)  # the close waits for the handler holding m0
            assert not closing.done()
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
            expected = list(sent)
        else:
            release.set()
            await first.close()
            expected = sent[1:]
        assert source not in backend._subs, "the first member is closed"
        sent.append(await bus.send("pm", agent, "m3", task_execution_id=execution))
        expected = [*expected, sent[-1]]
        await eventually(lambda: len(set(got)) >= len(expected), WAIT, "the standby member pinned, then handling")
        names = {m.id: m.content for m in sent}
        assert [names[i] for i in dict.fromkeys(got)] == [m.content for m in expected], "in send order"
        await standby.close()
