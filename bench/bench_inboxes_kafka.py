"""Kafka inboxes multiplexed per Bus (backends/kafka/inboxes.py, K2): open, deliver, steady latency, members.

    .venv/bin/python bench/bench_inboxes_kafka.py --agents 2000 10000 [--steady 280] [--seconds 10] [--runs 2]

One process, one Bus, ``bus.inbox(agent, broadcasts=False)`` per agent (direct messages only: the
broadcast hub is measured by ``squadbus simulate``). One message per agent is sent before the inboxes
open (it must wait for them; the open time includes the inbox group's join) and one after; every
agent must get exactly its two. Then ``--steady`` msgs/s to random agents for ``--seconds``, each
agent task acking what it gets: latency = delivery time - send time (one clock), sender in the same
process. The inbox group's members are read from the broker (DescribeGroups) and this process's
sockets from /proc while the inboxes are open. ``gc.freeze()`` once the agents' tasks run (as a host
runner does); the longest collector pause while sending is reported. Prints one JSON line per case;
starts its own tansu (memory storage) and stops it by PID at the end. Each case uses topics and an
inbox group of its own (``--partitions`` partitions, group session 3 s / heartbeat 1 s).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import time
import uuid

from squadbus.backends.kafka._driver import AIOKafkaAdminClient
from squadbus.core.bus import Bus
from squadbus.core.inbox import Inbox
from squadbus.testing.conformance import open_sockets
from squadbus.testing.servers.kafka import TansuServer


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


async def members(server: TansuServer, group: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=[server.bootstrap])
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    return sum(len(g[5]) for response in described for g in response.groups if g[1] == group)


async def one_case(server: TansuServer, agents: int, steady: float, seconds: float, partitions: int,
                   options: str) -> dict[str, object]:
    tag = uuid.uuid4().hex[:8]
    group = f"ib{tag}"
    url = (f"{server.url}?partitions={partitions}&idempotence=off&topic=b{tag}&inbox_group={group}"
           "&session_timeout_ms=3000&heartbeat_interval_ms=1000" + (f"&{options}" if options else ""))
    rss0, sockets0 = rss_mib(), open_sockets()
    async with Bus.from_url(url) as bus:
        names = [f"a{i}" for i in range(agents)]
        for first in range(0, agents, 500):
            await asyncio.gather(*(bus.send("pm", a, "before") for a in names[first:first + 500]))
        inboxes = [bus.inbox(a, broadcasts=False) for a in names]
        started = time.perf_counter()
        for first in range(0, agents, 500):
            await asyncio.gather(*(inbox.open() for inbox in inboxes[first:first + 500]))
        opened = time.perf_counter() - started
        backlog = await asyncio.gather(*(inbox.get(60) for inbox in inboxes))
        with_backlog = time.perf_counter() - started
        assert [d.message.recipient_id for d in backlog] == names
        for delivery in backlog:
            await delivery.ack()
        started = time.perf_counter()
        for first in range(0, agents, 500):
            await asyncio.gather(*(bus.send("pm", a, "after") for a in names[first:first + 500]))
        after = await asyncio.gather(*(inbox.get(60) for inbox in inboxes))
        deliver_each = time.perf_counter() - started
        assert [d.message.content for d in after] == ["after"] * agents
        for delivery in after:
            await delivery.ack()
        result: dict[str, object] = {
            "agents": agents, "open_s": round(opened, 3), "open_with_backlog_s": round(with_backlog, 3),
            "deliver_1_each_s": round(deliver_each, 3), "inbox_group_members": await members(server, group),
            "client_sockets": open_sockets() - sockets0, "rss_growth_mib": round(rss_mib() - rss0, 1),
        }
        if steady:
            result.update(await steady_state(bus, inboxes, names, steady, seconds, server))
        for first in range(0, agents, 500):
            await asyncio.gather(*(inbox.close() for inbox in inboxes[first:first + 500]))
        gc.unfreeze()
        return result


async def steady_state(bus: Bus, inboxes: list[Inbox], names: list[str], rate: float, seconds: float,
                       server: TansuServer) -> dict[str, object]:
    latencies: list[float] = []

    async def work(inbox: Inbox) -> None:
        async for delivery in inbox:
            latencies.append(time.time() - float(delivery.message.content))
            await delivery.ack()

    workers = [asyncio.create_task(work(inbox)) for inbox in inboxes]
    await asyncio.sleep(0)
    gc.collect()
    gc.freeze()  # as a host runner does once its agents run
    pauses: list[float] = []
    began = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - began[0])

    gc.callbacks.append(timed)
    rng = random.Random(0)
    assert server.proc is not None
    cpu0, wall0 = cpu_seconds(server.proc.pid), time.perf_counter()
    loop = asyncio.get_running_loop()
    count = int(rate * seconds)
    start = loop.time()
    sends = []
    for k in range(count):
        delay = start + k / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        sends.append(asyncio.ensure_future(bus.send("pm", rng.choice(names), repr(time.time()))))
    await asyncio.gather(*sends)
    deadline = loop.time() + 10
    while len(latencies) < count and loop.time() < deadline:
        await asyncio.sleep(0.05)
    server_cpu = (cpu_seconds(server.proc.pid) - cpu0) / (time.perf_counter() - wall0)
    gc.callbacks.remove(timed)
    for worker in workers:
        worker.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000, 2) if ordered else -1.0

    return {"steady_rate": rate, "sent": count, "received": len(latencies), "p50_ms": pct(0.5),
            "p99_ms": pct(0.99), "max_ms": pct(1.0), "tansu_cpu": round(server_cpu, 3),
            "longest_gc_pause_ms": round(max(pauses, default=0.0) * 1000, 1)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--steady", type=float, default=0.0, help="msgs/s to random agents after opening")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--options", default="", help="kafka:// URL options, e.g. fetch_max_wait_ms=50")
    args = parser.parse_args()
    with TansuServer() as server:
        for _ in range(args.runs):
            for agents in args.agents:
                print(json.dumps(await one_case(server, agents, args.steady, args.seconds, args.partitions,
                                                args.options)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
