"""The bench's load generator leaves no progress task running behind it: the ones it cancels have ended when it
returns (core.tasks.cancel_and_wait), so none can outlive the line or its event loop ("Task was destroyed but it is
pending")."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from squadbus.benchmarks import loadgen


class _HeldSide:
    """Acks every publish at once and hands a message back only on :meth:`release` (the warm-up at once);
    its stop has nothing to close, so it returns without giving the loop a turn."""

    name = "held"

    def __init__(self) -> None:
        self.deliver: Callable[[int], None] = lambda index: None
        self.held: list[int] = []

    async def start(self, deliver: Callable[[int], None]) -> dict[str, float]:
        self.deliver = deliver
        return {}

    async def publish(self, index: int) -> None:
        if index == loadgen.WARM_UP:
            self.deliver(index)
        else:
            self.held.append(index)

    def release(self) -> None:
        held, self.held = self.held, []
        for index in held:
            self.deliver(index)

    async def stop(self) -> None:
        return None


class _Progress(loadgen.Progress):
    """Silent; records what it was shown, and releases the side's messages once the drain shows."""

    def __init__(self, side: _HeldSide) -> None:
        super().__init__(None)
        self.side = side
        self.shown: list[str] = []

    def show(self, label: str, fraction: float, detail: str) -> None:
        self.shown.append(detail)
        if detail.startswith("draining"):
            self.side.release()


LOAD = loadgen.Load(rate=None, duration=0.0, count=3, size=32, senders=1)
BROKER = loadgen.Broker("held", "0", "none")


def _running(before: set[asyncio.Task[object]]) -> list[str]:
    """The tasks started since ``before`` that have not ended, by their coroutine's name."""
    return [getattr(task.get_coro(), "__qualname__", task.get_name())
            for task in asyncio.all_tasks() - before if not task.done()]


async def test_drive_returns_with_its_reporter_ended() -> None:
    side = _HeldSide()
    progress = _Progress(side)
    timeline = loadgen.Timeline()
    timeline.grow(LOAD.count or 0)
    await side.start(lambda index: None)
    before = asyncio.all_tasks()
    sent, acked, _, _ = await loadgen._drive(side, LOAD, timeline, progress, "line", lambda: 0)
    left = _running(before)
    assert (sent, acked) == (3, 3) and progress.shown
    assert not left, f"still running after _drive returned: {left}"


async def test_measure_returns_with_its_drain_progress_ended() -> None:
    side = _HeldSide()
    progress = _Progress(side)
    before = asyncio.all_tasks()
    line = await loadgen.measure(side, LOAD, BROKER, label="line", progress=progress)
    left = _running(before)
    assert (line.sent, line.acked, line.seen) == (3, 3, 3)
    assert any(detail.startswith("draining") for detail in progress.shown), progress.shown
    assert not left, f"still running after measure returned: {left}"
