"""NATS inboxes multiplexed per Bus (backends/nats/inboxes.py): open, deliver, steady latency, consumers.

    .venv/bin/python bench/bench_inboxes_nats.py --agents 2000 10000 [--steady 280] [--seconds 10] [--runs 2]

One process, one Bus, ``bus.inbox(agent, broadcasts=False)`` per agent (direct messages only: the
broadcast hub is measured by ``squadbus simulate``). One message per agent is sent before the inboxes
open (it must wait for them) and one after; every agent must get exactly its two. Then ``--steady``
msgs/s to random agents for ``--seconds``, each agent task acking what it gets: latency = delivery
time - send time (one clock), sender in the same process (the driver shared with the other backends'
inbox benchmarks is ``squadbus.benchmarks.inboxes``). JetStream consumers of the account and
client connections are read from the server while the inboxes are open. ``gc.freeze()`` once the
agents' tasks run (as a host runner does); the longest collector pause while sending is reported.
Prints one JSON line per case; starts its own nats-server (file storage, no ``sync_always``, as the
design's figures) in a temp dir and stops it by PID at the end. Each case uses a stream of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import tempfile
import urllib.request
import uuid

import nats
from squadbus.benchmarks.inboxes import close_all, open_and_deliver, rss_mib, steady_state
from squadbus.core.bus import Bus
from squadbus.testing.servers.nats import NatsServer


def connections(server: NatsServer) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.monitor_port}/varz", timeout=2) as reply:
        return int(json.load(reply)["connections"])


async def consumers(raw: nats.NATS) -> int:
    return (await raw.jetstream().account_info()).consumers


async def one_case(
    server: NatsServer, agents: int, steady: float, seconds: float, options: str = ""
) -> dict[str, object]:
    stream = f"b{uuid.uuid4().hex[:8]}"
    url = f"{server.url}?stream={stream}" + (f"&{options}" if options else "")
    raw = await nats.connect(server.url)
    rss0 = rss_mib()
    try:
        async with Bus.from_url(url) as bus:
            inboxes, names, result = await open_and_deliver(bus, agents)
            result.update({"jetstream_consumers": await consumers(raw), "nats_connections": connections(server) - 1,
                           "rss_growth_mib": round(rss_mib() - rss0, 1)})
            if steady:
                assert server.proc is not None

                async def probe() -> dict[str, object]:
                    return {"jetstream_consumers_steady": await consumers(raw)}

                result.update(await steady_state(bus, inboxes, names, steady, seconds, server_pid=server.proc.pid,
                                                 server_cpu_key="nats_server_cpu", probe=probe))
            await close_all(inboxes)
            gc.unfreeze()
            return result
    finally:
        js = raw.jetstream()
        for name in (stream, f"KV_{stream}-inboxes"):  # streams share agent.>: one at a time
            with contextlib.suppress(Exception):
                await js.delete_stream(name)
        await raw.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--steady", type=float, default=0.0, help="msgs/s to random agents after opening")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--options", default="", help="nats:// URL options, e.g. claim_interval=1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory, NatsServer(directory, sync_always=False) as server:
        for _ in range(args.runs):
            for agents in args.agents:
                print(json.dumps(await one_case(server, agents, args.steady, args.seconds, args.options)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
