"""The driver shared by the inbox benchmarks (``bench/bench_inboxes_<backend>.py``): open, deliver, steady state.

One process, one Bus, ``bus.inbox(agent, broadcasts=False)`` per agent.
:func:`open_and_deliver` sends one message per agent before the inboxes open
(it must wait for them) and one after; every agent must get exactly its two.
:func:`steady_state` then sends ``rate`` msgs/s to random agents for
``seconds``, each agent task acking what it gets: latency = delivery time -
send time (one clock, the sender in the same process). ``gc.freeze()`` once
the agents' tasks run (as a host runner does); the longest collector pause
while sending is reported, and the broker process's CPU share. What each
broker counts (consumers, connections) is the caller's, read by ``probe``
while the agents still run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import time
from collections.abc import Awaitable, Callable

from squadbus.core.bus import Bus
from squadbus.core.inbox import Inbox
from squadbus.core.tasks import cancel_and_wait

BATCH = 500
"""Sends, opens and closes are awaited this many at a time."""
DRAIN_SECONDS = 10.0
"""How long the steady state waits for the last deliveries after the last send."""


def rss_mib() -> float:
    """This process's resident memory in MiB (Linux ``/proc``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds process ``pid`` has used (Linux ``/proc``, 100 ticks a second)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


async def send_each(bus: Bus, names: list[str], content: str) -> None:
    """One direct message from ``pm`` to every agent of ``names``."""
    for first in range(0, len(names), BATCH):
        await asyncio.gather(*(bus.send("pm", a, content) for a in names[first:first + BATCH]))


async def open_and_deliver(bus: Bus, agents: int) -> tuple[list[Inbox], list[str], dict[str, object]]:
    """Open ``agents`` inboxes with a message waiting for each, then deliver one more to each.

    Returns the open inboxes, their agents' names and the figures (``open_s``,
    ``open_with_backlog_s``, ``deliver_1_each_s``).
    """
    names = [f"a{i}" for i in range(agents)]
    await send_each(bus, names, "before")
    inboxes = [bus.inbox(a, broadcasts=False) for a in names]
    started = time.perf_counter()
    for first in range(0, agents, BATCH):
        await asyncio.gather(*(inbox.open() for inbox in inboxes[first:first + BATCH]))
    opened = time.perf_counter() - started
    backlog = await asyncio.gather(*(inbox.get(60) for inbox in inboxes))
    with_backlog = time.perf_counter() - started
    assert [d.message.recipient_id for d in backlog] == names
    for delivery in backlog:
        await delivery.ack()
    started = time.perf_counter()
    await send_each(bus, names, "after")
    after = await asyncio.gather(*(inbox.get(60) for inbox in inboxes))
    deliver_each = time.perf_counter() - started
    assert [d.message.content for d in after] == ["after"] * agents
    for delivery in after:
        await delivery.ack()
    figures: dict[str, object] = {"agents": agents, "open_s": round(opened, 3),
                                  "open_with_backlog_s": round(with_backlog, 3),
                                  "deliver_1_each_s": round(deliver_each, 3)}
    return inboxes, names, figures


async def close_all(inboxes: list[Inbox]) -> None:
    """Close every inbox, :data:`BATCH` at a time."""
    for first in range(0, len(inboxes), BATCH):
        await asyncio.gather(*(inbox.close() for inbox in inboxes[first:first + BATCH]))


async def steady_state(
    bus: Bus, inboxes: list[Inbox], names: list[str], rate: float, seconds: float, *,
    server_pid: int, server_cpu_key: str, probe: Callable[[], Awaitable[dict[str, object]]] | None = None,
) -> dict[str, object]:
    """``rate`` msgs/s to random agents for ``seconds``; latency percentiles in ms and the broker's CPU share.

    ``server_cpu_key`` names the broker's CPU figure (``nats_server_cpu``);
    ``probe``'s figures are read after the last delivery, before the agents stop.
    """
    latencies: list[float] = []
    count = int(rate * seconds)
    all_in = asyncio.Event()

    async def work(inbox: Inbox) -> None:
        async for delivery in inbox:
            latencies.append(time.time() - float(delivery.message.content))
            if len(latencies) >= count:
                all_in.set()
            await delivery.ack()

    workers = [asyncio.create_task(work(inbox)) for inbox in inboxes]
    await asyncio.sleep(0)
    # As a host runner does once its agents run: what exists now is never collected again.
    gc.collect()
    gc.freeze()
    pauses: list[float] = []
    began = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - began[0])

    gc.callbacks.append(timed)
    rng = random.Random(0)
    cpu0, wall0 = cpu_seconds(server_pid), time.perf_counter()
    loop = asyncio.get_running_loop()
    start = loop.time()
    sends = []
    for k in range(count):
        delay = start + k / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        sends.append(asyncio.ensure_future(bus.send("pm", rng.choice(names), repr(time.time()))))
    await asyncio.gather(*sends)
    if count:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_in.wait(), DRAIN_SECONDS)
    server_cpu = (cpu_seconds(server_pid) - cpu0) / (time.perf_counter() - wall0)
    gc.callbacks.remove(timed)
    probed = await probe() if probe is not None else {}
    await cancel_and_wait(*workers)  # an agent whose inbox failed raises here: its figures would be short
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000, 2) if ordered else -1.0

    return {"steady_rate": rate, "sent": count, "received": len(latencies), "p50_ms": pct(0.5),
            "p99_ms": pct(0.99), "max_ms": pct(1.0), server_cpu_key: round(server_cpu, 3),
            **probed, "longest_gc_pause_ms": round(max(pauses, default=0.0) * 1000, 1)}
