"""RabbitMQ inboxes (backends/rabbitmq/inboxes.py: partition queues, one channel per Bus): N's cost.

    .venv/bin/python bench/bench_inboxes_rabbitmq.py --agents 200 2000 10000 [--timeout 500] [--steady 280]
        [--profile durable fast] [--partitions 16]

One process, one Bus, ``bus.inbox(agent, broadcasts=False)`` per agent (direct messages only). One
message per agent is sent before the inboxes open (it must wait for them) and one after; every agent
must get exactly its two. Reported per case: open time (of which the first open: creating the squad's
partition queues with the log's backlog of every agent; and with the backlog delivered), deliver-1-each
time, the case's queues and consumers and the node's channels (``rabbitmqctl``), the Erlang VM's RSS growth and
the client's RSS growth; a case that fails (or passes ``--timeout``) reports how many inboxes were
open and the error. With ``--steady`` msgs/s, the shared driver's steady state follows
(``squadbus.benchmarks.inboxes.steady_state``: random agents for ``--seconds``, latency p50/p99, the
node's CPU share). Starts its own private node in a temp dir and stops it by PID; each case uses a
namespace of its own. ``--profile durable fast`` runs each case under both profiles in turn (quorum
vs classic inbox queues). Prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tempfile
import time
import uuid

from squadbus.benchmarks.inboxes import steady_state
from squadbus.core.bus import Bus
from squadbus.core.inbox import Inbox
from squadbus.testing.servers.rabbitmq import RabbitServer

CHUNK = 100


def rss_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def node_rss(server: RabbitServer) -> float:
    return sum(rss_mib(pid) for pid in server._beam_pids())


def counts(server: RabbitServer, namespace: str) -> dict[str, int]:
    def rows(*args: str) -> list[str]:
        return [line for line in server.ctl(*args, "--quiet", timeout=120).splitlines()[1:] if line.strip()]

    channels = sum(int(line.split()[-1]) for line in rows("list_connections", "name", "channels"))
    mine = f"{namespace}."
    return {"queues": sum(r.strip().startswith(mine) for r in rows("list_queues", "name")), "channels": channels,
            "consumers": sum(r.strip().startswith(mine) for r in rows("list_consumers", "queue_name"))}


async def one_case(server: RabbitServer, agents: int, timeout: float, steady: float = 0.0,
                   seconds: float = 10.0, profile: str = "durable", partitions: int = 16,
                   precreate: bool = False) -> dict[str, object]:
    namespace = f"i{uuid.uuid4().hex[:8]}"
    url = f"{server.url}?namespace={namespace}&profile={profile}&inbox_partitions={partitions}"
    rss0, node0 = rss_mib(), node_rss(server)
    result: dict[str, object] = {"agents": agents, "profile": profile, "partitions": partitions,
                                 "precreated": precreate}
    inboxes: list[Inbox] = []
    async with Bus.from_url(url) as bus:
        names = [f"a{i}" for i in range(agents)]
        if precreate:  # another Bus created the partition queues before the messages were sent (no log copy)
            async with Bus.from_url(url) as creator, creator.inbox("warm-up", broadcasts=False):
                pass
        for first in range(0, agents, CHUNK):
            await asyncio.gather(*(bus.send("pm", a, "before") for a in names[first:first + CHUNK]))
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                # The first open creates the squad's partition queues and copies the log's backlog in.
                first_inbox = bus.inbox(names[0], broadcasts=False)
                await first_inbox.open()
                inboxes.append(first_inbox)
                result["first_open_s"] = round(time.perf_counter() - started, 3)
                for first in range(1, agents, CHUNK):
                    batch = [bus.inbox(a, broadcasts=False) for a in names[first:first + CHUNK]]
                    await asyncio.gather(*(inbox.open() for inbox in batch))
                    inboxes.extend(batch)
                result["open_s"] = round(time.perf_counter() - started, 3)
                backlog = await asyncio.gather(*(inbox.get(60) for inbox in inboxes))
                result["open_with_backlog_s"] = round(time.perf_counter() - started, 3)
                assert [d.message.recipient_id for d in backlog] == names
                for delivery in backlog:
                    await delivery.ack()
                began = time.perf_counter()
                for first in range(0, agents, CHUNK):
                    await asyncio.gather(*(bus.send("pm", a, "after") for a in names[first:first + CHUNK]))
                after = await asyncio.gather(*(inbox.get(60) for inbox in inboxes))
                result["deliver_1_each_s"] = round(time.perf_counter() - began, 3)
                assert [d.message.content for d in after] == ["after"] * agents
                for delivery in after:
                    await delivery.ack()
        except Exception as exc:  # a limit reached: how far it got, and why
            result["failed_after_s"] = round(time.perf_counter() - started, 3)
            result["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        result["inboxes_open"] = len(inboxes)
        result.update(await asyncio.to_thread(counts, server, namespace))
        result["node_rss_growth_mib"] = round(node_rss(server) - node0, 1)
        result["client_rss_growth_mib"] = round(rss_mib() - rss0, 1)
        if steady and len(inboxes) == agents and "error" not in result:
            result.update(await steady_state(bus, inboxes, names, steady, seconds,
                                             server_pid=server._beam_pids()[0], server_cpu_key="node_cpu"))
            gc.unfreeze()
        for first in range(0, len(inboxes), CHUNK):
            await asyncio.gather(*(inbox.close() for inbox in inboxes[first:first + CHUNK]),
                                 return_exceptions=True)
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, nargs="+", default=[200, 2000, 10000])
    parser.add_argument("--timeout", type=float, default=500.0, help="seconds a case may take")
    parser.add_argument("--steady", type=float, default=0.0, help="msgs/s to random agents after opening")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--partitions", type=int, default=16, help="inbox_partitions of the URL")
    parser.add_argument("--precreate", action="store_true",
                        help="create the partition queues before the messages sent before opening (no log copy)")
    parser.add_argument("--profile", nargs="+", choices=("durable", "fast"), default=["durable"],
                        help="profiles to run each case under, in turn")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory, RabbitServer(directory) as server:
        for _ in range(args.runs):
            for agents in args.agents:
                for profile in args.profile:
                    result = await one_case(server, agents, args.timeout, args.steady, args.seconds, profile,
                                            args.partitions, args.precreate)
                    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
