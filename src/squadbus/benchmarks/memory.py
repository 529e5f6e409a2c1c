"""Memory-backend benchmarks: throughput, open-loop latency, fan-in cost, and the guide's bus beside it.

Every squadbus line is printed beside a baseline doing the same work in the
same run: a bare ``asyncio.Queue`` producer/consumer (the floor of any
in-process bus) and the guide's ``MessageBus`` (:mod:`.guide_bus`).

``run`` is the fixed suite (``squadbus bench --suite``, ``bench/bench_memory.py``);
``TARGET`` is what ``squadbus bench`` loads on memory:// (:mod:`.loadgen`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from squadbus import __version__
from squadbus.backends.memory import MemoryBackend, MemorySettings
from squadbus.benchmarks import loadgen
from squadbus.benchmarks.guide_bus import AgentMessageResponse, GuideMessageBus
from squadbus.benchmarks.openloop import drive
from squadbus.benchmarks.stats import Result, median_of
from squadbus.core.backend import ConsumerOptions, Delivery, Subscription
from squadbus.core.bus import Bus
from squadbus.core.tasks import cancel_and_wait

PAYLOAD = "x" * 1024
ROUNDS = 3


def _bus() -> Bus:
    # The defaults, replay and dedupe windows included: what a user gets.
    return Bus(MemoryBackend(MemorySettings()))


async def squadbus_throughput(count: int, agents: int = 1) -> Result:
    """Direct sends to one agent, handled by that agent's subscription, with ``agents`` subscribed."""
    async with _bus() as bus:
        done = asyncio.Event()
        seen = 0

        async def handler(delivery: Delivery) -> None:
            nonlocal seen
            seen += 1
            if seen == count:
                done.set()

        async def idle(delivery: Delivery) -> None:
            return None

        for i in range(1, agents):
            await bus.subscribe(f"agent.message.agent-{i}", idle, group=f"inbox-agent-{i}")
        await bus.subscribe("agent.message.agent-0", handler, group="inbox-agent-0",
                            options=ConsumerOptions(max_pending=10_000))
        await asyncio.sleep(0.01)  # let every subscriber task start before timing
        start = time.perf_counter()
        for _ in range(count):
            await bus.send("pm", "agent-0", PAYLOAD, "task")
        await done.wait()
        elapsed = time.perf_counter() - start
    return Result(f"squadbus memory direct ({agents} agents)", count, elapsed)


async def queue_throughput(count: int) -> Result:
    """The floor: an ``asyncio.Queue`` of 1 KiB strings with one consumer task."""
    queue: asyncio.Queue[str] = asyncio.Queue(maxsize=10_000)
    done = asyncio.Event()

    async def consume() -> None:
        for _ in range(count):
            await queue.get()
        done.set()

    task = asyncio.create_task(consume())
    start = time.perf_counter()
    for _ in range(count):
        await queue.put(PAYLOAD)
    await done.wait()
    elapsed = time.perf_counter() - start
    await task
    return Result("raw asyncio.Queue (no envelope)", count, elapsed)


async def guide_direct_throughput(count: int, agents: int = 1) -> Result:
    """The guide's bus: send_message to one agent with a subscriber callback."""
    bus = GuideMessageBus()
    ids = [uuid.uuid4() for _ in range(agents)]
    for agent in ids:
        bus.register(agent)
    seen = 0

    async def callback(message: AgentMessageResponse) -> None:
        nonlocal seen
        seen += 1

    bus.subscribe(ids[0], callback)
    sender = uuid.uuid4()
    start = time.perf_counter()
    for _ in range(count):
        await bus.send_message(sender, ids[0], PAYLOAD, "task")
    elapsed = time.perf_counter() - start
    assert seen == count
    return Result(f"guide MessageBus direct ({agents} agents)", count, elapsed)


async def squadbus_broadcast(count: int, agents: int) -> Result:
    """Squad broadcasts, each handled by every one of ``agents`` subscribers (count = handler calls)."""
    async with _bus() as bus:
        total = count * agents
        done = asyncio.Event()
        seen = 0

        async def handler(delivery: Delivery) -> None:
            nonlocal seen
            seen += 1
            if seen == total:
                done.set()

        for i in range(agents):
            await bus.subscribe("agent.message.broadcast", handler, group=f"inbox-agent-{i}")
        await asyncio.sleep(0.01)  # let every subscriber task start before timing
        start = time.perf_counter()
        for _ in range(count):
            await bus.broadcast("pm", PAYLOAD)
        await done.wait()
        elapsed = time.perf_counter() - start
    return Result(f"squadbus memory broadcast x{agents}", total, elapsed, notes="count = deliveries")


async def guide_broadcast(count: int, agents: int) -> Result:
    """The guide's broadcast: copied into every queue, every subscriber called (count = handler calls)."""
    bus = GuideMessageBus()
    seen = 0

    async def callback(message: AgentMessageResponse) -> None:
        nonlocal seen
        seen += 1

    for _ in range(agents):
        agent = uuid.uuid4()
        bus.register(agent)
        bus.subscribe(agent, callback)
    sender = uuid.uuid4()
    start = time.perf_counter()
    for _ in range(count):
        await bus.send_message(sender, None, PAYLOAD, "broadcast")
    elapsed = time.perf_counter() - start
    assert seen == count * agents
    return Result(f"guide MessageBus broadcast x{agents}", count * agents, elapsed, notes="count = deliveries")


async def squadbus_latency(rate: float, count: int) -> Result:
    """Open loop at ``rate`` msgs/s: latency from the intended send time to the handler."""
    async with _bus() as bus:
        latencies: list[float] = []
        done = asyncio.Event()

        async def handler(delivery: Delivery) -> None:
            due = float(delivery.message.headers["due"])
            latencies.append((time.perf_counter() - due) * 1000)
            if len(latencies) == count:
                done.set()

        await bus.subscribe("agent.message.agent-0", handler, group="inbox-agent-0")

        async def send(i: int, due: float) -> None:
            await bus.send("pm", "agent-0", PAYLOAD, headers={"due": repr(due)})

        elapsed = await drive(rate, count, send)
        await done.wait()
    return Result(f"squadbus memory open loop {rate:.0f}/s", count, elapsed, latencies)


async def queue_latency(rate: float, count: int) -> Result:
    """The same open loop through a bare ``asyncio.Queue``."""
    queue: asyncio.Queue[float] = asyncio.Queue()
    latencies: list[float] = []

    async def consume() -> None:
        for _ in range(count):
            due = await queue.get()
            latencies.append((time.perf_counter() - due) * 1000)

    task = asyncio.create_task(consume())

    async def send(i: int, due: float) -> None:
        await queue.put(due)

    elapsed = await drive(rate, count, send)
    await task
    return Result(f"raw asyncio.Queue open loop {rate:.0f}/s", count, elapsed, latencies)


async def run(*, url: str = "memory://", count: int = 200_000, rate: float = 10_000.0) -> list[Result]:
    """Every memory benchmark; ``url`` must be memory:// (kept for the ``squadbus bench`` interface)."""
    if not url.startswith("memory://"):
        raise ValueError("the memory benchmarks run on memory:// only")
    # Throughput lines are the median of ROUNDS rounds, run interleaved so drift hits every line alike.
    rounds: dict[str, list[Result]] = {}
    for _ in range(ROUNDS):
        for result in (
            await queue_throughput(count),
            await squadbus_throughput(count),
            await guide_direct_throughput(count // 4),
            await squadbus_throughput(count, agents=100),
            await squadbus_throughput(count, agents=10_000),
            await squadbus_broadcast(max(1, count // 2000), agents=1000),
            await guide_broadcast(max(1, count // 2000), agents=1000),
        ):
            rounds.setdefault(result.name, []).append(result)
    results = [median_of(r) for r in rounds.values()]
    # Two seconds of open loop, at least one message: a latency line always has samples.
    latency_count = max(1, int(rate * 2))
    results += [await queue_latency(rate, latency_count), await squadbus_latency(rate, latency_count)]
    return results


# ---- squadbus bench: the raw side on memory:// -----------------------------------------------------


class QueueSide:
    """The raw side of ``squadbus bench`` on memory://: an ``asyncio.Queue`` of byte payloads and one
    consumer task; a put is the ack (nothing is stored anywhere else)."""

    def __init__(self, url: str, size: int, tag: str) -> None:
        self.name = "asyncio.Queue: put + one consumer task"
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._filler = b"x" * (size - loadgen.INDEX_DIGITS)
        self._task: asyncio.Task[None] | None = None

    async def start(self, deliver: Callable[[int], None]) -> dict[str, float]:
        async def consume() -> None:
            while True:
                deliver(loadgen.index_of(await self._queue.get()))

        self._task = asyncio.create_task(consume())
        return {}

    async def publish(self, index: int) -> None:
        await self._queue.put(loadgen.stamp(index).encode() + self._filler)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)


async def _broker(url: str) -> loadgen.Broker:
    settings = MemorySettings.from_url(url)
    return loadgen.Broker("memory (in-process)", f"squadbus {__version__}",
                          f"not durable: held in this process only (retain_messages={settings.retain_messages})")


async def _nothing_left(url: str, tag: str, subs: list[Subscription]) -> None:
    return None


TARGET = loadgen.Target(squadbus_url=lambda url, tag: url, raw=QueueSide, broker=_broker, cleanup=_nothing_left)
"""How ``squadbus bench`` runs on memory://."""
