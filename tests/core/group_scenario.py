"""One consumer-group scenario shared by the ``group_figures`` tests of every backend.

A group reads ``ACKED`` messages and acks them, dead-letters ``DEAD`` (its
handler raises, ``max_deliver=1``), then holds ``HELD`` in its handlers while
``WAITING`` more wait behind them: with ``max_in_flight = batch_size =
max_pending = HELD`` no backend hands out more than ``HELD`` at once.
All messages share one execution, so they are in one partition, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable

from squadbus.core.backend import ConsumerOptions, Delivery, DescribesGroups, GroupFigures
from squadbus.core.bus import Bus

ACKED, DEAD, HELD, WAITING = 4, 1, 2, 3
PUBLISHED = ACKED + DEAD + HELD + WAITING


async def figures_of(backend: DescribesGroups, group: str) -> list[GroupFigures]:
    """The figures the backend reports for ``group`` (one per pattern)."""
    return [f for f in await backend.group_figures() if f.group == group]


async def wait_for_figures(
    backend: DescribesGroups, group: str, done: Callable[[GroupFigures], bool], *, timeout: float = 30.0
) -> GroupFigures:
    """Poll until the one figure of ``group`` satisfies ``done``; fail with the last figures seen."""
    last: list[GroupFigures] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while True:
                last = await figures_of(backend, group)
                if len(last) == 1 and done(last[0]):
                    return last[0]
                await asyncio.sleep(0.05)
    raise AssertionError(f"group {group} never reached the expected figures; last seen {last}")


@contextlib.asynccontextmanager
async def scenario(bus: Bus, group: str) -> AsyncIterator[str]:
    """Publish the scenario's messages, start the group, hold ``HELD`` in handlers; yields the pattern.

    On exit the held handlers are released and the subscription closed.
    """
    recipient = f"r{uuid.uuid4().hex[:8]}"
    execution = uuid.uuid4()
    for kind, count in (("ack", ACKED), ("bad", DEAD), ("hold", HELD), ("wait", WAITING)):
        for i in range(count):
            await bus.send("pm", recipient, f"{kind}-{i}", kind, task_execution_id=execution)
    release = asyncio.Event()

    async def handle(delivery: Delivery) -> None:
        kind = delivery.message.message_type
        if kind == "bad":
            raise RuntimeError("bad message, as the test wants")
        if kind in ("hold", "wait"):
            await release.wait()

    pattern = f"agent.message.{recipient}"
    options = ConsumerOptions(max_deliver=1, max_in_flight=HELD, batch_size=HELD, max_pending=HELD, ack_wait=60)
    sub = await bus.subscribe(pattern, handle, group=group, options=options)
    try:
        yield pattern
    finally:
        release.set()
        await sub.close()
