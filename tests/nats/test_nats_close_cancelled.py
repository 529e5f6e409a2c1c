"""A cancelled close of a NATS subscription's source (backends/nats/subscriber.py) raises CancelledError in its
caller and still naks what it had queued and forgets the subscription, against a real nats-server."""

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

WAIT = 10.0


def _slow_to_end() -> asyncio.Task[None]:
    """A task that, once cancelled, takes a while to end (as a pull task finishing a request)."""

    async def run() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)
            raise

    return asyncio.create_task(run())


async def test_a_cancelled_source_close_raises_and_still_naks_what_it_queued(nats_url: str) -> None:
    # e.g. asyncio.wait_for(bus.close(), t) timing out while the pull tasks end: the caller is cancelled (was:
    # the close absorbed it and returned), and the source still naks its queue (another member gets it at once,
    # not after ack_wait) and is forgotten by the backend.
    agent, group = f"agent-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    pattern = subjects.direct(agent)
    options = ConsumerOptions(ack_wait=60)
    handling, release = asyncio.Event(), asyncio.Event()
    got: list[tuple[uuid.UUID, int]] = []

    async def hold(delivery: Delivery) -> None:
        handling.set()
        await release.wait()

    async def collect(delivery: Delivery) -> None:
        got.append((delivery.message.id, delivery.attempt))

    async with Bus.from_url(nats_url) as bus:
        backend = bus.backend
        assert isinstance(backend, NatsBackend)
        member = await backend.subscribe(pattern, hold, group=group, options=options)
        source = member.source
        sent = [await bus.send("pm", agent, f"m{i}") for i in range(3)]
        await asyncio.wait_for(handling.wait(), WAIT)  # m0 is handled; m1 and m2 wait in the source's queue
        await eventually(lambda: len(source._queue) == 2, WAIT, "m1 and m2 queued in the source")
        slow = _slow_to_end()
        source._tasks.append(slow)
        closing = asyncio.create_task(source.close())
        await asyncio.sleep(0.05)  # closing now waits for the slow task's end
        assert not closing.done()
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert slow.done() and all(task.done() for task in source._tasks)
        assert source not in backend._subs, "forgotten by the backend"
        other = await backend.subscribe(pattern, collect, group=group, options=options)
        await eventually(lambda: len(got) == 2, WAIT, "m1 and m2 naked, so at once to the other member")
        assert sorted(got) == sorted((m.id, 2) for m in sent[1:]), "each once more (their order: the server's)"
        release.set()
        await member.close()
        await other.close()
