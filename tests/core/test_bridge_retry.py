"""The bridge retries a copy the destination refused in place, so executions keep their order
(the same on real servers: tests/redis/test_bridge_destination_down.py)."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

from squadbus.backends.memory import MemoryBackend
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.core.errors import BackendTimeout, ConfigError
from squadbus.workers.bridge import Bridge


class FlakyBackend(MemoryBackend):
    """A memory backend whose publishes fail while ``down`` is set (the copy may be stored anyway)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.store_anyway = False
        self.attempts = 0

    async def publish(self, message: Message) -> None:
        self.attempts += 1
        if self.down:
            if self.store_anyway:  # a timeout after the store: the retry must not store it twice
                await super().publish(message)
            raise BackendTimeout("destination did not confirm")
        await super().publish(message)


async def wait_for(check: object, what: str, seconds: float = 10.0) -> None:
    try:
        async with asyncio.timeout(seconds):
            while not check():  # type: ignore[operator]
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"never: {what}") from None


async def replayed(bus: Bus, execution: uuid.UUID) -> list[str]:
    return [m.content async for _, m in bus.replay(execution)]


@pytest.mark.parametrize("stored_anyway", [False, True])
async def test_a_refused_copy_is_retried_before_anything_after_it(
    stored_anyway: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="squadbus.workers.bridge")
    flaky = FlakyBackend()
    flaky.store_anyway = stored_anyway
    executions = [uuid.uuid4(), uuid.uuid4()]
    async with Bus(MemoryBackend()) as source, Bus(flaky) as destination:
        bridge = Bridge(source, destination, retry_base=0.01, retry_max=0.05)
        await bridge.start()
        try:
            for i in range(3):
                for execution in executions:
                    await source.send("pm", "dev-1", f"{i}", task_execution_id=execution)
            await wait_for(lambda: bridge.copied == 6, "the first six copies")
            flaky.down = True
            for i in range(3, 10):
                for execution in executions:
                    await source.send("pm", "dev-1", f"{i}", task_execution_id=execution)
            await wait_for(lambda: bridge.retries >= 5, "five retries")
            assert bridge.copied == 6, "nothing after the refused copy was copied"
            flaky.down = False
            await wait_for(lambda: bridge.copied == 20, "every copy")
        finally:
            await bridge.stop()
        for execution in executions:
            assert await replayed(destination, execution) == [str(i) for i in range(10)]
    assert bridge.outages == 1
    warnings = [r for r in caplog.records if r.name == "squadbus.workers.bridge" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "memory" in warnings[0].getMessage() and "BackendTimeout" in warnings[0].getMessage()
    assert any("stores copies again" in r.getMessage() for r in caplog.records)
    assert source.stats.nacked == 0


async def test_stop_while_the_destination_is_down_gives_the_copy_back(caplog: pytest.LogCaptureFixture) -> None:
    flaky = FlakyBackend()
    flaky.down = True
    execution = uuid.uuid4()
    source = Bus(MemoryBackend())
    async with source, Bus(flaky) as destination:
        bridge = Bridge(source, destination, group="b", retry_base=0.01, retry_max=10.0)
        await bridge.start()
        await source.send("pm", "dev-1", "waits", task_execution_id=execution)
        await wait_for(lambda: bridge.retries >= 3, "retries")  # now in a 10 s pause or publishing
        await bridge.stop()  # the Bus's close_timeout would be 10 s: stop must not wait for it
        assert bridge.copied == 0
        assert any("goes back to the source" in r.getMessage() for r in caplog.records)
        flaky.down = False
        again = Bridge(source, destination, group="b")
        await again.start()
        try:
            await wait_for(lambda: again.copied == 1, "the copy given back to the source")
        finally:
            await again.stop()
        assert await replayed(destination, execution) == ["waits"]


def test_retry_settings_are_checked() -> None:
    bus = Bus(MemoryBackend())
    for base, top in ((0.0, 1.0), (2.0, 1.0)):
        with pytest.raises(ConfigError):
            Bridge(bus, bus, retry_base=base, retry_max=top)
