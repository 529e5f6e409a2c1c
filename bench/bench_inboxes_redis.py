"""Redis inboxes multiplexed per Bus (backends/redis/inboxes.py): open, deliver, steady latency, connections.

    .venv/bin/python bench/bench_inboxes_redis.py --agents 2000 10000 [--steady 280] [--seconds 10] [--runs 2]

One process, one Bus, ``bus.inbox(agent, broadcasts=False)`` per agent (direct messages only: the
broadcast hub is measured by ``squadbus simulate``). One message per agent is sent before the inboxes
open (it must wait for them) and one after; every agent must get exactly its two. Then ``--steady``
msgs/s to random agents for ``--seconds``, each agent task acking what it gets: latency = delivery
time - send time (one clock), sender in the same process (the driver shared with the other backends'
inbox benchmarks is ``squadbus.benchmarks.inboxes``). Redis client connections are counted with
``CLIENT LIST`` (name ``squadbus``) while the inboxes are open. ``gc.freeze()`` once the agents' tasks
run (as a host runner does); the longest collector pause while sending is reported. Prints one JSON
line per case; starts its own redis-server (``fast``) and stops it by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import uuid

import redis.asyncio as aioredis

from squadbus.benchmarks.inboxes import close_all, open_and_deliver, rss_mib, steady_state
from squadbus.core.bus import Bus
from squadbus.testing.servers.redis import RedisServer


async def squadbus_clients(raw: aioredis.Redis) -> int:
    listed = await raw.execute_command("CLIENT", "LIST")
    text = listed.decode() if isinstance(listed, bytes) else str(listed)
    return sum(1 for line in text.splitlines() if "name=squadbus" in line)


async def one_case(
    server: RedisServer, agents: int, steady: float, seconds: float, options: str = ""
) -> dict[str, object]:
    url = f"{server.url}?prefix=b{uuid.uuid4().hex[:8]}" + (f"&{options}" if options else "")
    raw = aioredis.Redis(port=server.port)
    rss0 = rss_mib()
    try:
        async with Bus.from_url(url) as bus:
            inboxes, names, result = await open_and_deliver(bus, agents)
            result.update({"redis_clients": await squadbus_clients(raw), "rss_growth_mib": round(rss_mib() - rss0, 1)})
            if steady:
                assert server.proc is not None

                async def probe() -> dict[str, object]:
                    return {"redis_clients_steady": await squadbus_clients(raw)}

                result.update(await steady_state(bus, inboxes, names, steady, seconds, server_pid=server.proc.pid,
                                                 server_cpu_key="redis_server_cpu", probe=probe))
            await close_all(inboxes)
            gc.unfreeze()
            return result
    finally:
        await raw.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--steady", type=float, default=0.0, help="msgs/s to random agents after opening")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--options", default="", help="redis:// URL options, e.g. claim_interval=1")
    args = parser.parse_args()
    server = RedisServer("fast")
    server.start()
    try:
        for _ in range(args.runs):
            for agents in args.agents:
                print(json.dumps(await one_case(server, agents, args.steady, args.seconds, args.options)), flush=True)
    finally:
        server.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
