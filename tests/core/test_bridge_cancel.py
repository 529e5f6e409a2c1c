"""The bridge's retry of a refused copy (workers/bridge.py) never absorbs a cancellation of its handler, and
leaves no copy attempt running behind it (core.tasks; see tests/core/test_tasks.py)."""

from __future__ import annotations

import asyncio

import pytest

from squadbus.backends.memory import MemoryBackend
from squadbus.core import envelope
from squadbus.core.backend import Delivery
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.core.errors import BackendTimeout
from squadbus.workers.bridge import Bridge


class _Delivery(Delivery):
    __slots__ = ("nacks",)

    def __init__(self) -> None:
        super().__init__(envelope.build(subject="agent.message.dev-1", sender_id="pm", content="waits"))
        self.nacks: list[float] = []

    def _ack(self) -> None:
        return None

    def _nack(self, delay: float) -> None:
        self.nacks.append(delay)


class _HangingBackend(MemoryBackend):
    """A destination whose publishes hang, and once cancelled take ``unwind`` seconds to end."""

    def __init__(self, unwind: float) -> None:
        super().__init__()
        self.unwind = unwind
        self.publishing = 0
        self.ended = 0

    async def publish(self, message: Message) -> None:
        self.publishing += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(self.unwind)
            self.ended += 1
            raise


async def _retrying(bridge: Bridge, destination: _HangingBackend) -> asyncio.Task[bool]:
    """The bridge's handler retrying one refused copy, now waiting on a second publish that hangs."""
    delivery = _Delivery()
    copy = delivery.message
    retry = asyncio.create_task(bridge._retry(delivery, copy, BackendTimeout("destination did not confirm")))
    async with asyncio.timeout(5):
        while not destination.publishing:
            await asyncio.sleep(0.005)
    return retry


async def test_a_handler_cancelled_while_a_stop_waits_for_the_attempt_is_cancelled() -> None:
    # stop() ends the wait: the hanging attempt is cancelled and awaited (0.3 s to end); the handler is
    # cancelled meanwhile (a cancelled Bus.close cancels the handlers): the cancel must come through (was:
    # absorbed with the attempt's own CancelledError, and the handler went on to nack and return False).
    destination = _HangingBackend(unwind=0.3)
    async with Bus(MemoryBackend()) as source, Bus(destination) as target:
        bridge = Bridge(source, target, retry_base=0.01, retry_max=0.02)
        retry = await _retrying(bridge, destination)
        bridge._stopping.set()
        await asyncio.sleep(0.05)  # the handler now waits for the cancelled attempt to end
        assert not retry.done()
        retry.cancel()
        with pytest.raises(asyncio.CancelledError):
            await retry
        assert destination.ended == 1, "the attempt ended before the cancel came through"


async def test_a_handler_cancelled_while_an_attempt_runs_ends_the_attempt() -> None:
    # The handler is cancelled while the copy attempt hangs (no stop): the attempt is cancelled and has ended
    # when the cancel comes through (was: left running behind the handler).
    destination = _HangingBackend(unwind=0.05)
    async with Bus(MemoryBackend()) as source, Bus(destination) as target:
        bridge = Bridge(source, target, retry_base=0.01, retry_max=0.02)
        retry = await _retrying(bridge, destination)
        retry.cancel()
        with pytest.raises(asyncio.CancelledError):
            await retry
        assert destination.ended == 1, "the attempt was cancelled and ended"
