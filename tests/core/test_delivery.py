"""Delivery settlement: ack_soon settles without a coroutine when the backend can, and wakes waiters."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest

from squadbus.core import envelope
from squadbus.core.backend import Delivery


class _Recording(Delivery):
    __slots__ = ("acks", "pending")

    def __init__(self, pending: Awaitable[None] | None = None) -> None:
        super().__init__(envelope.build(subject="agent.message.a", sender_id="pm", content="x"))
        self.acks = 0
        self.pending = pending

    def _ack(self) -> Awaitable[None] | None:
        self.acks += 1
        return self.pending

    def _nack(self, delay: float) -> Awaitable[None] | None:
        return None


class _Broken(_Recording):
    def _ack(self) -> Awaitable[None] | None:
        raise ConnectionError("network down")


async def test_ack_soon_settles_at_once_when_the_backend_does() -> None:
    delivery = _Recording()
    waiter = delivery.settled_future()
    assert delivery.ack_soon() is None
    assert delivery.settled == "ack" and delivery.acks == 1
    assert waiter.done() and waiter.result() == "ack"
    assert delivery.ack_soon() is None and not await delivery.ack() and not await delivery.nack()
    assert delivery.acks == 1, "settling is idempotent"


async def test_ack_soon_returns_what_to_wait_for_and_wakes_after_it() -> None:
    sent = asyncio.get_running_loop().create_future()
    delivery = _Recording(sent)
    waiter = delivery.settled_future()
    pending = delivery.ack_soon()
    assert pending is not None and delivery.settled == "ack"
    finishing = asyncio.ensure_future(pending)
    await asyncio.sleep(0)
    assert not waiter.done(), "the waiter wakes once the backend's ack completed"
    sent.set_result(None)
    await finishing
    assert waiter.result() == "ack"


async def test_ack_soon_wakes_waiters_when_the_backend_raises() -> None:
    delivery = _Broken()
    waiter = delivery.settled_future()
    with pytest.raises(ConnectionError):
        delivery.ack_soon()
    assert delivery.settled == "ack" and waiter.done()
