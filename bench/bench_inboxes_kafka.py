"""Kafka inboxes multiplexed per Bus (backends/kafka/inboxes.py, K2): open, deliver, steady latency, members.

    .venv/bin/python bench/bench_inboxes_kafka.py --agents 2000 10000 [--steady 280] [--seconds 10] [--runs 2]

One process, one Bus, ``bus.inbox(agent, broadcasts=False)`` per agent (direct messages only: the
broadcast hub is measured by ``squadbus simulate``). One message per agent is sent before the inboxes
open (it must wait for them; the open time includes the inbox group's join) and one after; every
agent must get exactly its two. Then ``--steady`` msgs/s to random agents for ``--seconds``, each
agent task acking what it gets: latency = delivery time - send time (one clock), sender in the same
process. The inbox group's members are read from the broker (DescribeGroups) and this process's
sockets from /proc while the inboxes are open. ``gc.freeze()`` once the agents' tasks run (as a host
runner does); the longest collector pause while sending is reported (the driver shared with the other
backends' inbox benchmarks is ``squadbus.benchmarks.inboxes``). Prints one JSON line per case;
starts its own tansu (memory storage) and stops it by PID at the end. Each case uses topics and an
inbox group of its own (``--partitions`` partitions, group session 3 s / heartbeat 1 s).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import uuid

from squadbus.backends.kafka._driver import AIOKafkaAdminClient
from squadbus.benchmarks.inboxes import close_all, open_and_deliver, rss_mib, steady_state
from squadbus.core.bus import Bus
from squadbus.testing.conformance import open_sockets
from squadbus.testing.servers.kafka import TansuServer


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
        inboxes, names, result = await open_and_deliver(bus, agents)
        result.update({"inbox_group_members": await members(server, group),
                       "client_sockets": open_sockets() - sockets0, "rss_growth_mib": round(rss_mib() - rss0, 1)})
        if steady:
            assert server.proc is not None
            result.update(await steady_state(bus, inboxes, names, steady, seconds, server_pid=server.proc.pid,
                                             server_cpu_key="tansu_cpu"))
        await close_all(inboxes)
        gc.unfreeze()
        return result


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
