"""The memory backend's DeliverySource (a member of a group): poll and receive in order, a receive that
times out, a wake-up a cancelled receive was given goes to another member, nothing after close."""

from __future__ import annotations

import asyncio

import pytest

from squadbus.backends.memory.group import GroupBuffer
from squadbus.backends.memory.subscription import GroupSource
from squadbus.core import envelope
from squadbus.core.backend import ConsumerOptions
from squadbus.core.errors import Closed

SUBJECT = "agent.message.dev-1"


def _push(group: GroupBuffer, *contents: str) -> None:
    for content in contents:
        group.push((envelope.build(subject=SUBJECT, sender_id="pm", content=content), 0))


async def test_poll_and_receive_hand_out_in_order_each_counted_in_flight() -> None:
    group = GroupBuffer("g", SUBJECT, ConsumerOptions())
    source = GroupSource(group)
    assert source.poll(1) == () and (source.pattern, source.group) == (SUBJECT, "g")
    _push(group, "1", "2", "3", "4")
    one = source.poll(1)
    assert [d.message.content for d in one] == ["1"]
    rest = await source.receive(10, 0)
    assert [d.message.content for d in rest] == ["2", "3", "4"] and group.inflight == 4
    await one[0].ack()
    await rest[0].nack()
    assert group.inflight == 2
    again = source.poll(5)
    assert [(d.message.content, d.attempt) for d in again] == [("2", 2)], "a redelivery counts its attempt"


async def test_receive_waits_for_the_first_or_returns_nothing_after_wait() -> None:
    group = GroupBuffer("g", SUBJECT, ConsumerOptions())
    source = GroupSource(group)
    assert await source.receive(5, 0.01) == ()
    assert not group.getters or all(f.done() for f in group.getters)
    waiting = asyncio.ensure_future(source.receive(5, 10))
    await asyncio.sleep(0)
    _push(group, "1", "2")
    assert [d.message.content for d in await waiting] == ["1", "2"]


async def test_a_cancelled_receive_passes_its_wake_up_to_another_member() -> None:
    group = GroupBuffer("g", SUBJECT, ConsumerOptions())
    first, second = GroupSource(group), GroupSource(group)
    cancelled = asyncio.ensure_future(first.receive(1, 10))
    await asyncio.sleep(0)
    other = asyncio.ensure_future(second.receive(1, 10))
    await asyncio.sleep(0)
    _push(group, "1")  # wakes the first waiter
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    got = await asyncio.wait_for(other, 5)
    assert [d.message.content for d in got] == ["1"]


async def test_give_back_returns_deliveries_as_never_delivered_and_close_stops_handing_out() -> None:
    group = GroupBuffer("g", SUBJECT, ConsumerOptions())
    source = GroupSource(group)
    _push(group, "1", "2")
    got = source.poll(2)
    source.give_back(got)
    assert group.inflight == 0
    again = source.poll(2)
    assert [(d.message.content, d.attempt) for d in again] == [("1", 1), ("2", 1)]
    _push(group, "3")
    await source.close()
    assert source.poll(1) == ()
    with pytest.raises(Closed):
        await source.receive(1, 0)
    assert len(group.buffer) == 1, "what the group holds stays for its other members"
