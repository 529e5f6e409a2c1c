"""Prototype for docs/design/inboxes.md: many agents' inboxes over a few Redis connections.

    .venv/bin/python bench/proto_inboxes_redis.py --agents 2000 10000 [--readers 4] [--runs 3] [--design notify]
    .venv/bin/python bench/proto_inboxes_redis.py --agents 2000 --kill9        # host crash case
    .venv/bin/python bench/proto_inboxes_redis.py --agents 10000 --steady 280 --design block|notify

Each agent keeps its own stream (``proto:s:agent.message.<id>``, as squadbus's
Redis backend already writes) and a consumer group ``inbox`` on it. A host
process opens N inboxes with pipelined ``XGROUP CREATE ... 0 MKSTREAM`` and
reads them all with ``--readers`` connections, each issuing one
``XREADGROUP GROUP inbox <host> COUNT 512 BLOCK 1000 STREAMS <its N/readers
keys> > > ...`` per call; entries are demultiplexed by stream key and acked
with pipelined XACK on one more connection. One message per agent is sent
*before* its inbox opens and one after; both must arrive exactly once.

``--kill9``: a child host reads every message without acking and is killed
with SIGKILL; a second host then opens the same inboxes (``XAUTOCLAIM`` per
stream, min-idle 0, in one pipeline) and must receive every message.

Prints one JSON line per measurement. Starts its own redis-server and stops it
by PID in ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import redis.asyncio as aioredis

from squadbus.testing.servers.redis import RedisServer

GROUP = "inbox"
PIPE_CHUNK = 1000


def rss_mib() -> float:
    """Resident set size of this process in MiB (from /proc)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def stream_of(agent: int) -> str:
    return f"proto:s:agent.message.a{agent}"


async def send_one_each(r: aioredis.Redis, agents: int, tag: str, bell: bool = False) -> None:
    for start in range(0, agents, PIPE_CHUNK):
        pipe = r.pipeline(transaction=False)
        for i in range(start, min(agents, start + PIPE_CHUNK)):
            pipe.xadd(stream_of(i), {"m": f"{tag}-{i}"})
            if bell:
                pipe.publish(f"proto:n:a{i}", b"")
        await pipe.execute()


async def open_inboxes(r: aioredis.Redis, agents: int, host: str, claim: bool) -> None:
    """XGROUP CREATE (and, on a takeover, XAUTOCLAIM) for every agent, pipelined."""
    for start in range(0, agents, PIPE_CHUNK):
        pipe = r.pipeline(transaction=False)
        for i in range(start, min(agents, start + PIPE_CHUNK)):
            pipe.execute_command("XGROUP", "CREATE", stream_of(i), GROUP, "0", "MKSTREAM")
        await pipe.execute(raise_on_error=False)  # BUSYGROUP when it exists: fine
        if claim:
            pipe = r.pipeline(transaction=False)
            for i in range(start, min(agents, start + PIPE_CHUNK)):
                pipe.xautoclaim(stream_of(i), GROUP, host, 0, "0-0", count=100)
            await pipe.execute()


class Host:
    """One host process's reading side: ``readers`` connections, each one XREADGROUP over its share of keys."""

    def __init__(self, url: str, agents: int, readers: int, host: str, ack: bool) -> None:
        self.url = url
        self.agents = agents
        self.host = host
        self.ack = ack
        self.readers = [aioredis.Redis.from_url(url) for _ in range(readers)]
        self.acker = aioredis.Redis.from_url(url)
        self.received: dict[str, int] = {}
        self.total = 0
        self.calls = 0
        self.arrived = asyncio.Event()
        self.expected = 0
        self.tasks: list[asyncio.Task[None]] = []
        self.ack_lock = asyncio.Lock()  # one ack connection, not a pool of them
        self.latencies: list[float] = []

    def start(self, expected: int) -> None:
        self.expected = expected
        keys = [stream_of(i) for i in range(self.agents)]
        share = -(-len(keys) // len(self.readers))
        for n, conn in enumerate(self.readers):
            mine = keys[n * share:(n + 1) * share]
            if mine:
                self.tasks.append(asyncio.create_task(self._read(conn, mine)))

    async def _read(self, conn: aioredis.Redis, keys: list[str]) -> None:
        pending_first = {k: "0" for k in keys}  # what this consumer already holds (after a claim)
        streams = {k: ">" for k in keys}
        reply = await conn.xreadgroup(GROUP, self.host, pending_first, count=512)
        while True:
            await self._deliver_reply(reply)
            self.calls += 1
            reply = await conn.xreadgroup(GROUP, self.host, streams, count=512, block=1000)

    async def _deliver_reply(self, reply: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None) -> None:
        """Demultiplex one XREADGROUP reply by stream key, then ack it all in one pipeline."""
        pipe = self.acker.pipeline(transaction=False)
        now = time.time()
        for key, entries in reply or []:
            if not entries:
                continue
            name = key.decode()
            self.received[name] = self.received.get(name, 0) + len(entries)
            self.total += len(entries)
            for _eid, fields in entries:
                sent = fields.get(b"t")
                if sent is not None:
                    self.latencies.append(now - float(sent))
            pipe.xack(name, GROUP, *(eid for eid, _ in entries))
        if self.ack and len(pipe):
            async with self.ack_lock:
                await pipe.execute()
        if self.total >= self.expected:
            self.arrived.set()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.wait(self.tasks, timeout=2.0)  # redis-py can swallow a cancel mid-pipeline
        for task in self.tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a reader that lost its connection at shutdown is expected
        for conn in [*self.readers, self.acker]:
            await conn.aclose()


class NotifiedHost(Host):
    """The doorbell variant: one Pub/Sub connection SUBSCRIBEd to ``proto:n:<agent>`` per open inbox.

    The publisher sends ``PUBLISH proto:n:<agent>`` with each XADD (in the real
    backend: inside the publish Lua script). A notification marks the agent's
    stream dirty; one reader issues a non-blocking XREADGROUP over just the dirty
    keys. The initial backlog read (and, in the real design, a slow sweep that
    covers lost notifications) reads every key without blocking.
    """

    def __init__(self, url: str, agents: int, readers: int, host: str, ack: bool) -> None:
        super().__init__(url, agents, 1, host, ack)
        self.bell = aioredis.Redis.from_url(url)
        self.dirty: set[str] = set()
        self.wake = asyncio.Event()

    def start(self, expected: int) -> None:
        self.expected = expected
        self.tasks.append(asyncio.create_task(self._run()))

    async def _run(self) -> None:
        pubsub = self.bell.pubsub()
        for begin in range(0, self.agents, PIPE_CHUNK):
            await pubsub.subscribe(*(f"proto:n:a{i}" for i in range(begin, min(self.agents, begin + PIPE_CHUNK))))
        self.tasks.append(asyncio.create_task(self._listen(pubsub)))
        conn = self.readers[0]
        keys = [stream_of(i) for i in range(self.agents)]
        for begin in range(0, len(keys), PIPE_CHUNK):  # backlog: sent before the inbox opened
            chunk = {k: ">" for k in keys[begin:begin + PIPE_CHUNK]}
            await self._deliver_reply(await conn.xreadgroup(GROUP, self.host, chunk, count=512))
        while True:
            await self.wake.wait()
            self.wake.clear()
            dirty, self.dirty = self.dirty, set()
            self.calls += 1
            await self._deliver_reply(await conn.xreadgroup(GROUP, self.host, {k: ">" for k in dirty}, count=512))

    async def _listen(self, pubsub: aioredis.client.PubSub) -> None:
        async for item in pubsub.listen():
            if item["type"] == "message":
                self.dirty.add("proto:s:agent.message." + item["channel"].decode()[len("proto:n:"):])
                self.wake.set()

    async def close(self) -> None:
        await super().close()
        await self.bell.aclose()


def server_cpu_s(pid: int) -> float:
    """utime + stime of a process in seconds (from /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def steady_run(url: str, pid: int, agents: int, readers: int, design: str, rate: float, seconds: float
                     ) -> dict[str, object]:
    """Messages to random agents at ``rate``/s for ``seconds``: latency, Redis CPU, client CPU."""
    import random

    admin = aioredis.Redis.from_url(url)
    await admin.flushall()
    cls = NotifiedHost if design == "notify" else Host
    host = cls(url, agents, readers, "host-1", ack=True)
    await open_inboxes(host.acker, agents, "host-1", claim=False)
    total = int(rate * seconds)
    host.start(expected=total)
    await asyncio.sleep(1.0)
    sender = aioredis.Redis.from_url(url)
    cpu0, pcpu0, t0 = server_cpu_s(pid), time.process_time(), time.perf_counter()
    for n in range(total):
        i = random.randrange(agents)
        pipe = sender.pipeline(transaction=False)
        pipe.xadd(stream_of(i), {"t": repr(time.time())})
        if design == "notify":
            pipe.publish(f"proto:n:a{i}", b"")
        await pipe.execute()
        delay = t0 + (n + 1) / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    await asyncio.wait_for(host.arrived.wait(), 60)
    wall = time.perf_counter() - t0
    lat = sorted(host.latencies)
    result = {
        "backend": "redis", "design": design, "agents": agents, "readers": len(host.readers), "rate": rate,
        "sent": total, "delivered": host.total,
        "p50_ms": round(lat[len(lat) // 2] * 1000, 2), "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2),
        "redis_cpu_pct": round(100 * (server_cpu_s(pid) - cpu0) / wall, 1),
        "client_cpu_pct": round(100 * (time.process_time() - pcpu0) / wall, 1),
        "broker_clients": len(await admin.client_list()) - 2,  # minus admin and sender
    }
    await host.close()
    await sender.aclose()
    await admin.aclose()
    return result


async def broker_facts(admin: aioredis.Redis) -> dict[str, object]:
    clients = await admin.client_list()
    stats = await admin.info("commandstats")
    mem = await admin.info("memory")
    xrg = stats.get("cmdstat_xreadgroup", {})
    return {
        "broker_clients": len(clients) - 1,  # minus this admin connection
        "xreadgroup_usec_per_call": xrg.get("usec_per_call"),
        "xreadgroup_calls": xrg.get("calls"),
        "redis_used_mib": round(mem["used_memory"] / 2**20, 1),
    }


async def one_run(url: str, agents: int, readers: int, design: str) -> dict[str, object]:
    admin = aioredis.Redis.from_url(url)
    await admin.flushall()
    await admin.config_resetstat()
    rss0 = rss_mib()
    await send_one_each(admin, agents, "before")  # sent before the inboxes exist: must wait for them
    host = (NotifiedHost if design == "notify" else Host)(url, agents, readers, "host-1", ack=True)
    t0 = time.perf_counter()
    await open_inboxes(host.acker, agents, "host-1", claim=False)
    host.start(expected=2 * agents)
    open_s = time.perf_counter() - t0
    while host.total < agents:  # the backlog sent before the inboxes opened
        await asyncio.sleep(0.005)
    backlog_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    await send_one_each(admin, agents, "after", bell=design == "notify")
    await asyncio.wait_for(host.arrived.wait(), 120)
    deliver_s = time.perf_counter() - t1
    await asyncio.sleep(0.2)
    facts = await broker_facts(admin)
    # Idle cost: how long one blocking XREADGROUP over this many keys takes the server.
    per_call = []
    probe = aioredis.Redis.from_url(url)
    keys = {stream_of(i): ">" for i in range(agents)}
    for _ in range(5):
        t = time.perf_counter()
        await probe.xreadgroup(GROUP, "probe", keys, count=1)
        per_call.append((time.perf_counter() - t) * 1000)
    await probe.aclose()
    counts = sorted(set(host.received.values()))
    result = {
        "backend": "redis", "design": design, "agents": agents, "readers": len(host.readers),
        "open_s": round(open_s, 3), "open_and_backlog_s": round(backlog_s, 3), "deliver_1_each_s": round(deliver_s, 3),
        "delivered": host.total, "expected": 2 * agents, "per_agent_counts": counts,
        "client_rss_delta_mib": round(rss_mib() - rss0, 1),
        "nonblocking_xreadgroup_all_keys_ms": round(min(per_call), 2), **facts,
    }
    await host.close()
    await admin.aclose()
    return result


async def child_host(url: str, agents: int) -> None:
    """Read every message without acking, say so on stdout, then wait to be killed."""
    host = Host(url, agents, 4, "host-dead", ack=False)
    await open_inboxes(host.acker, agents, "host-dead", claim=False)
    host.start(expected=agents)
    await host.arrived.wait()
    print(f"read {host.total}", flush=True)
    await asyncio.sleep(3600)


def start_child(argv: list[str]) -> subprocess.Popen[bytes]:
    """The crashing host: a child process whose stdout says when it has read everything."""
    return subprocess.Popen(argv, stdout=subprocess.PIPE)


async def kill9_run(url: str, agents: int) -> dict[str, object]:
    admin = aioredis.Redis.from_url(url)
    await admin.flushall()
    await send_one_each(admin, agents, "before")
    child = start_child([sys.executable, __file__, "--child", url, "--agents", str(agents)])
    try:
        assert child.stdout is not None
        line = await asyncio.to_thread(child.stdout.readline)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
    pending = sum([(await admin.xpending(stream_of(i), GROUP))["pending"] for i in range(0, agents, 100)])
    host = Host(url, agents, 4, "host-2", ack=True)
    t0 = time.perf_counter()
    await open_inboxes(host.acker, agents, "host-2", claim=True)
    host.start(expected=agents)
    await asyncio.wait_for(host.arrived.wait(), 120)
    took = time.perf_counter() - t0
    result = {
        "backend": "redis", "case": "kill -9 of a host, inboxes reopened in another process", "agents": agents,
        "child_said": line.decode().strip(), "pending_sampled_every_100th": pending,
        "reopen_and_redeliver_s": round(took, 3), "redelivered": host.total,
        "per_agent_counts": sorted(set(host.received.values())),
    }
    await host.close()
    await admin.aclose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--readers", type=int, default=4, help="reading connections per host (<= 6: +1 acker)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kill9", action="store_true")
    parser.add_argument("--steady", type=float, metavar="RATE", help="steady-state test at RATE msgs/s")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--design", choices=("block", "notify"), default="block")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child_host(args.child, args.agents[0]))
        return
    server = RedisServer("fast")
    try:
        server.start()
        for agents in args.agents:
            for run in range(1 if args.kill9 else args.runs):
                if args.steady:
                    assert server.proc is not None
                    job = steady_run(server.url, server.proc.pid, agents, args.readers, args.design, args.steady,
                                     args.seconds)
                else:
                    job = (kill9_run(server.url, agents) if args.kill9
                           else one_run(server.url, agents, args.readers, args.design))
                result = asyncio.run(job)
                print(json.dumps({"run": run + 1, **result}), flush=True)
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
