"""Prototype for docs/design/inboxes.md: many agents' inboxes over one JetStream consumer per host.

    .venv/bin/python bench/proto_inboxes_nats.py --agents 2000 10000 [--runs 3]        # open + one each
    .venv/bin/python bench/proto_inboxes_nats.py --agents 2000 --case late             # filters added later
    .venv/bin/python bench/proto_inboxes_nats.py --agents 2000 10000 --case cursor     # per-agent backlog probe
    .venv/bin/python bench/proto_inboxes_nats.py --agents 10000 --case steady --rate 280
    .venv/bin/python bench/proto_inboxes_nats.py --agents 2000 10000 --case bell --rate 280  # doorbell design

Stream ``PROTO`` (``agent.>``, file storage, ``allow_direct``). A host opens N
inboxes as one durable pull consumer whose ``filter_subjects`` lists the N
direct subjects ``agent.message.<id>`` (NATS 2.10+), and fetches 512 at a time.

* ``open``: one message per agent is published before the consumer exists,
  one after; both must arrive exactly once.
* ``late``: the consumer starts with half the agents, consumes, then its
  ``filter_subjects`` grows in steps of 500 (agents opening one by one, as in
  a running host). Counts how many of the late agents' earlier messages arrive.
* ``cursor``: cost of the store-backed cursor's open step: one
  ``DIRECT.GET next_by_subj`` per agent (is there anything after my cursor?).
* ``bell``: the doorbell design (:class:`BellHost`): open, backlog, one each,
  then ``--rate`` for ``--seconds``; no JetStream consumer at all.
* ``steady``: messages to random agents at ``--rate``: latency p50/p99 and
  nats-server CPU with N filter subjects.

Prints one JSON line per measurement; starts its own nats-server and stops it
by PID in ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import tempfile
import time
from pathlib import Path

from nats.js import api

import nats
from squadbus.testing.servers.nats import NatsServer

STREAM = "PROTO"


def rss_mib() -> float:
    """Resident set size of this process in MiB (from /proc)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    """utime + stime of a process in seconds (from /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def subject_of(agent: int) -> str:
    return f"agent.message.a{agent}"


async def send_one_each(js: nats.js.JetStreamContext, agents: range, tag: str, bell: nats.NATS | None = None
                        ) -> None:
    """One message to each agent; with ``bell``, ring ``bell.<subject>`` after each PubAck (stored first)."""
    for begin in range(0, len(agents), 1000):
        chunk = agents[begin:begin + 1000]
        acks = [await js.publish_async(subject_of(i), f"{tag} {time.time()!r}".encode()) for i in chunk]
        await asyncio.gather(*acks)
        if bell is not None:
            for i in chunk:
                await bell.publish("bell." + subject_of(i), b"")


def host_config(agents: range) -> api.ConsumerConfig:
    return api.ConsumerConfig(
        name="host-1", durable_name="host-1", ack_policy=api.AckPolicy.EXPLICIT, ack_wait=30,
        deliver_policy=api.DeliverPolicy.ALL, max_ack_pending=10_000,
        filter_subjects=[subject_of(i) for i in agents],
    )


class Reader:
    """Fetch from the host consumer, count per subject (the demux), ack each message."""

    def __init__(self, js: nats.js.JetStreamContext) -> None:
        self.js = js
        self.received: dict[str, int] = {}
        self.latencies: list[float] = []
        self.total = 0
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.sub = await self.js.pull_subscribe_bind(durable="host-1", stream=STREAM)
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                msgs = await self.sub.fetch(512, timeout=0.5)
            except nats.errors.TimeoutError:
                continue
            now = time.time()
            for msg in msgs:
                self.received[msg.subject] = self.received.get(msg.subject, 0) + 1
                self.total += 1
                sent = msg.data.split(b" ", 1)[1]
                self.latencies.append(now - float(sent))
                await msg.ack()

    async def until(self, count: int, timeout: float) -> bool:
        deadline = time.perf_counter() + timeout
        while self.total < count and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        return self.total >= count

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.wait([self.task], timeout=2.0)
        await self.sub.unsubscribe()


async def fresh_stream(url: str) -> tuple[nats.NATS, nats.js.JetStreamContext]:
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=30)
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_stream(STREAM)
    await js.add_stream(api.StreamConfig(name=STREAM, subjects=["agent.>"], storage=api.StorageType.FILE,
                                         allow_direct=True))
    return nc, js


async def case_open(url: str, agents: int) -> dict[str, object]:
    nc, js = await fresh_stream(url)
    rss0 = rss_mib()
    await send_one_each(js, range(agents), "before")
    config = host_config(range(agents))
    t0 = time.perf_counter()
    await js.add_consumer(STREAM, config)
    reader = Reader(js)
    await reader.start()
    open_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    await send_one_each(js, range(agents), "after")
    ok = await reader.until(2 * agents, 120)
    deliver_s = time.perf_counter() - t1
    info = await js.account_info()
    result = {
        "backend": "nats", "design": "one consumer per host, filter_subjects = its agents", "agents": agents,
        "config_bytes": len(json.dumps(config.as_dict())), "open_s": round(open_s, 3),
        "deliver_2_each_s": round(deliver_s, 3), "all_arrived": ok, "delivered": reader.total,
        "per_agent_counts": sorted(set(reader.received.values())), "consumers": info.consumers,
        "client_rss_delta_mib": round(rss_mib() - rss0, 1),
    }
    await reader.stop()
    await nc.close()
    return result


async def case_late(url: str, agents: int) -> dict[str, object]:
    nc, js = await fresh_stream(url)
    half = agents // 2
    await js.add_consumer(STREAM, host_config(range(half)))
    reader = Reader(js)
    await reader.start()
    await send_one_each(js, range(agents), "before")  # the late half's inboxes are not open yet
    await reader.until(half, 30)
    t0 = time.perf_counter()
    for upto in range(half + 500, agents + 1, 500):  # agents open on the running host, 500 at a time
        await js.add_consumer(STREAM, host_config(range(upto)))
    grow_s = time.perf_counter() - t0
    await reader.until(agents, 3)
    late = sum(1 for i in range(half, agents) if reader.received.get(subject_of(i)))
    result = {
        "backend": "nats", "case": "filter_subjects grown on a running consumer", "agents": agents,
        "updates": (agents - half) // 500, "grow_s": round(grow_s, 3),
        "late_agents": agents - half, "late_agents_whose_earlier_message_arrived": late,
    }
    await reader.stop()
    await nc.close()
    return result


async def case_cursor(url: str, agents: int) -> dict[str, object]:
    nc, js = await fresh_stream(url)
    await send_one_each(js, range(0, agents, 2), "before")  # half the agents have a backlog
    t0 = time.perf_counter()
    found = 0
    for begin in range(0, agents, 200):
        async def probe(i: int) -> bool:
            try:
                raw = await js.get_msg(STREAM, seq=1, next=True, subject=subject_of(i), direct=True)
            except nats.js.errors.NotFoundError:
                return False
            return raw.subject == subject_of(i)  # a direct get's 404 comes back as an empty message
        found += sum(await asyncio.gather(*(probe(i) for i in range(begin, min(agents, begin + 200)))))
    took = time.perf_counter() - t0
    info = await js.account_info()
    await nc.close()
    return {
        "backend": "nats", "case": "open = DIRECT.GET next_by_subj per agent (store-backed cursor)",
        "agents": agents, "open_s": round(took, 3), "agents_with_backlog_found": found,
        "consumers": info.consumers,
    }


async def case_steady(url: str, pid: int, agents: int, rate: float, seconds: float) -> dict[str, object]:
    nc, js = await fresh_stream(url)
    t = time.perf_counter()
    await js.add_consumer(STREAM, host_config(range(agents)))  # empty stream: no backlog to scan
    create_s = time.perf_counter() - t
    reader = Reader(js)
    await reader.start()
    await asyncio.sleep(1.0)
    total = int(rate * seconds)
    cpu0, pcpu0, t0 = cpu_s(pid), time.process_time(), time.perf_counter()
    for n in range(total):
        await js.publish(subject_of(random.randrange(agents)), f"m {time.time()!r}".encode())
        delay = t0 + (n + 1) / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    ok = await reader.until(total, 60)
    wall = time.perf_counter() - t0
    lat = sorted(reader.latencies)
    result = {
        "backend": "nats", "design": "one consumer, filter_subjects", "agents": agents, "rate": rate,
        "create_on_empty_stream_s": round(create_s, 3), "sent": total, "delivered": reader.total, "all_arrived": ok,
        "p50_ms": round(lat[len(lat) // 2] * 1000, 2), "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2),
        "nats_cpu_pct": round(100 * (cpu_s(pid) - cpu0) / wall, 1),
        "client_cpu_pct": round(100 * (time.process_time() - pcpu0) / wall, 1),
    }
    await reader.stop()
    await nc.close()
    return result


class BellHost:
    """Doorbell + store-backed cursor: a core-NATS subscription per open agent, no JetStream consumer.

    The publisher rings ``bell.agent.message.<id>`` (core NATS, no payload)
    after the PubAck, so the message is stored before anyone looks (a core
    subscription on the stored subject itself races the store: measured, some
    messages were missed). Interest-routed: only the hosting process hears it.
    The bell only says "look": the host reads the agent's next
    stored message with ``DIRECT.GET next_by_subj`` from its cursor (last acked
    stream sequence + 1), so order, backlog and crash recovery all come from the
    stream and the cursor. The cursor is saved in a KV bucket on each ack here
    (the real design coalesces saves).
    """

    def __init__(self, nc: nats.NATS, js: nats.js.JetStreamContext, kv: object) -> None:
        self.nc, self.js, self.kv = nc, js, kv
        self.cursor: dict[str, int] = {}
        self.busy: set[str] = set()
        self.again: set[str] = set()
        self.received: dict[str, int] = {}
        self.latencies: list[float] = []
        self.total = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def open(self, agents: range) -> None:
        async def bell(msg: nats.aio.msg.Msg) -> None:
            self.poke(msg.subject[len("bell."):])

        for begin in range(0, len(agents), 1000):
            chunk = agents[begin:begin + 1000]
            for i in chunk:
                self.cursor[subject_of(i)] = 0  # the real design reads it from the KV bucket
                await self.nc.subscribe("bell." + subject_of(i), cb=bell)
            await self.nc.flush()
            for i in chunk:  # backlog: sent before the inbox opened
                self.poke(subject_of(i))

    def poke(self, subject: str) -> None:
        if subject in self.busy:
            self.again.add(subject)
            return
        self.busy.add(subject)
        task = asyncio.create_task(self._drain(subject))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _drain(self, subject: str) -> None:
        try:
            while True:
                self.again.discard(subject)
                try:
                    raw = await self.js.get_msg(STREAM, seq=self.cursor[subject] + 1, next=True, subject=subject,
                                                direct=True)
                except nats.js.errors.NotFoundError:
                    raw = None
                if raw is None or raw.subject != subject:  # nothing after the cursor
                    if subject in self.again:
                        continue
                    return
                self.received[subject] = self.received.get(subject, 0) + 1
                self.total += 1
                assert raw.data is not None
                self.latencies.append(time.time() - float(raw.data.split(b" ", 1)[1]))
                assert raw.seq is not None
                self.cursor[subject] = raw.seq  # ack = advance the cursor
                await self.kv.put(subject.replace(".", "_"), str(raw.seq).encode())  # type: ignore[attr-defined]
        finally:
            self.busy.discard(subject)

    async def until(self, count: int, timeout: float) -> bool:
        deadline = time.perf_counter() + timeout
        while self.total < count and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        return self.total >= count


async def case_bell(url: str, pid: int, agents: int, rate: float, seconds: float) -> dict[str, object]:
    nc, js = await fresh_stream(url)
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_key_value("cursors")
    kv = await js.create_key_value(bucket="cursors", history=1)
    rss0 = rss_mib()
    await send_one_each(js, range(agents), "before")
    host = BellHost(nc, js, kv)
    t0 = time.perf_counter()
    await host.open(range(agents))
    open_s = time.perf_counter() - t0
    await host.until(agents, 120)
    backlog_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    await send_one_each(js, range(agents), "after", bell=nc)
    ok = await host.until(2 * agents, 120)
    deliver_s = time.perf_counter() - t1
    rss = rss_mib() - rss0
    host.latencies.clear()
    total = int(rate * seconds)
    start = host.total
    cpu0, pcpu0, t2 = cpu_s(pid), time.process_time(), time.perf_counter()
    for n in range(total):
        agent = random.randrange(agents)
        await js.publish(subject_of(agent), f"m {time.time()!r}".encode())
        await nc.publish("bell." + subject_of(agent), b"")
        delay = t2 + (n + 1) / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    ok = await host.until(start + total, 60) and ok
    wall = time.perf_counter() - t2
    lat = sorted(host.latencies)
    info = await js.account_info()
    await nc.close()
    return {
        "backend": "nats", "design": "core-NATS doorbell per agent + cursor + DIRECT.GET", "agents": agents,
        "open_s": round(open_s, 3), "open_and_backlog_s": round(backlog_s, 3),
        "deliver_1_each_s": round(deliver_s, 3), "all_arrived": ok,
        "delivered": host.total, "expected": 2 * agents + total, "consumers": info.consumers,
        "client_rss_delta_mib": round(rss, 1), "rate": rate, "sent": total,
        "p50_ms": round(lat[len(lat) // 2] * 1000, 2), "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2),
        "nats_cpu_pct": round(100 * (cpu_s(pid) - cpu0) / wall, 1),
        "client_cpu_pct": round(100 * (time.process_time() - pcpu0) / wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--case", choices=("open", "late", "cursor", "steady", "bell"), default="open")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--rate", type=float, default=280.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="proto-nats-") as tmp:
        server = NatsServer(Path(tmp), sync_always=False)
        try:
            server.start()
            assert server.proc is not None
            for agents in args.agents:
                for run in range(args.runs):
                    if args.case == "open":
                        job = case_open(server.url, agents)
                    elif args.case == "late":
                        job = case_late(server.url, agents)
                    elif args.case == "cursor":
                        job = case_cursor(server.url, agents)
                    elif args.case == "bell":
                        job = case_bell(server.url, server.proc.pid, agents, args.rate, args.seconds)
                    else:
                        job = case_steady(server.url, server.proc.pid, agents, args.rate, args.seconds)
                    print(json.dumps({"run": run + 1, **asyncio.run(job)}), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
