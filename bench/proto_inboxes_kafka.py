"""Prototype for docs/design/inboxes.md: many agents' inboxes over one Kafka group member per host.

    .venv/bin/python bench/proto_inboxes_kafka.py --agents 2000 10000 [--runs 2]
    .venv/bin/python bench/proto_inboxes_kafka.py --agents 2000 --kill9

Inbox topic ``inbox-<ns>``, new per run (``--partitions``, default 16), records keyed by the
recipient agent, so one agent's messages are in one partition, in order. A
host is ONE ``AIOKafkaConsumer`` in the group ``<topic>-inboxes`` (manual commit);
opening an inbox only registers the agent in an in-process dict, and records
are demultiplexed by key. Agents are placed by partition: a host hosts the
agents whose partition the group assigned to it.

* default: one message per agent before the host exists, one after; time to
  open (join) and to deliver, group members, RSS; then a second host joins and
  the partitions split: every record goes to exactly one host.
* ``--kill9``: a child host reads every record without committing and is
  killed with SIGKILL; a new host joins and must receive every record again.

Prints one JSON line per measurement; starts its own tansu broker and stops it
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

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from squadbus.testing.servers.kafka import TansuServer


def rss_mib() -> float:
    """Resident set size of this process in MiB (from /proc)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def send_one_each(bootstrap: str, topic: str, agents: int, tag: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for begin in range(0, agents, 1000):
            futures = [await producer.send(topic, key=f"a{i}".encode(), value=f"{tag} {time.time()!r}".encode())
                       for i in range(begin, min(agents, begin + 1000))]
            await asyncio.gather(*futures)
    finally:
        await producer.stop()


class Host:
    """One group member; ``inboxes`` maps agent -> count received (the in-process demux)."""

    def __init__(self, bootstrap: str, topic: str, agents: int, name: str, commit: bool) -> None:
        self.consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, group_id=f"{topic}-inboxes", enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=3000, heartbeat_interval_ms=1000,
            client_id=name, max_poll_records=1000,
        )
        self.inboxes: dict[bytes, int] = {f"a{i}".encode(): 0 for i in range(agents)}
        self.commit = commit
        self.total = 0
        self.strangers = 0  # records for an agent this host does not host
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=200, max_records=1000)
            for records in batches.values():
                for record in records:
                    if record.key in self.inboxes:
                        self.inboxes[record.key] += 1
                    else:
                        self.strangers += 1
                    self.total += 1
            if batches and self.commit:
                await self.consumer.commit()

    async def until(self, count: int, timeout: float) -> bool:
        deadline = time.perf_counter() + timeout
        while self.total < count and time.perf_counter() < deadline:
            await asyncio.sleep(0.02)
        return self.total >= count

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.wait([self.task], timeout=2.0)
        await self.consumer.stop()


async def fresh_topic(bootstrap: str, partitions: int) -> str:
    """A new topic per run (deleting and re-creating one on tansu hung a later run)."""
    topic = f"inbox-{time.time_ns()}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()
    return topic


async def group_members(bootstrap: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([f"{topic}-inboxes"])
        # DescribeGroups v0..: (error_code, group_id, state, protocol_type, protocol, members, ...)
        return sum(len(group[5]) for response in described for group in response.groups)
    except Exception as exc:  # tansu may not answer DescribeGroups: say so, do not guess
        print(f"  describe_consumer_groups failed: {exc!r}", file=sys.stderr)
        return -1
    finally:
        await admin.close()


async def one_run(bootstrap: str, agents: int, partitions: int) -> dict[str, object]:
    topic = await fresh_topic(bootstrap, partitions)
    rss0 = rss_mib()
    await send_one_each(bootstrap, topic, agents, "before")
    host = Host(bootstrap, topic, agents, "host-1", commit=True)
    t0 = time.perf_counter()
    await host.start()
    await host.until(agents, 60)
    open_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    await send_one_each(bootstrap, topic, agents, "after")
    ok = await host.until(2 * agents, 60)
    deliver_s = time.perf_counter() - t1
    members_one = await group_members(bootstrap, topic)
    rss = rss_mib() - rss0
    counts = sorted(set(host.inboxes.values()))
    print(f"  one host: open {open_s:.2f}s deliver {deliver_s:.2f}s", file=sys.stderr, flush=True)
    # A second host joins: the partitions split, each record reaches one host.
    second = Host(bootstrap, topic, agents, "host-2", commit=True)
    t2 = time.perf_counter()
    await second.start()
    while not (second.consumer.assignment() and len(host.consumer.assignment()) < partitions):
        await asyncio.sleep(0.05)
        if time.perf_counter() - t2 > 30:
            break
    rebalance_s = time.perf_counter() - t2
    before = (host.total, second.total)
    await send_one_each(bootstrap, topic, agents, "split")
    await asyncio.sleep(0)
    deadline = time.perf_counter() + 30
    while host.total + second.total < sum(before) + agents and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    split = (host.total - before[0], second.total - before[1])
    members_two = await group_members(bootstrap, topic)
    result = {
        "backend": "kafka(tansu)", "design": "one group member per host, agents placed by partition",
        "agents": agents, "partitions": partitions, "open_incl_join_and_backlog_s": round(open_s, 3),
        "deliver_1_each_s": round(deliver_s, 3), "all_arrived": ok,
        "per_agent_counts": counts, "group_members": members_one,
        "client_rss_delta_mib": round(rss, 1), "second_host_rebalance_s": round(rebalance_s, 3),
        "split_records_host1_host2": split, "split_total_expected": agents, "group_members_two_hosts": members_two,
        "assignment_host1_host2": (len(host.consumer.assignment()), len(second.consumer.assignment())),
    }
    await second.stop()
    await host.stop()
    return result


async def child_host(bootstrap: str, topic: str, agents: int) -> None:
    host = Host(bootstrap, topic, agents, "host-dead", commit=False)
    await host.start()
    await host.until(agents, 60)
    print(f"read {host.total}", flush=True)
    await asyncio.sleep(3600)


def start_child(argv: list[str]) -> subprocess.Popen[bytes]:
    """The crashing host: a child process whose stdout says when it has read everything."""
    return subprocess.Popen(argv, stdout=subprocess.PIPE)


async def kill9_run(bootstrap: str, agents: int, partitions: int) -> dict[str, object]:
    topic = await fresh_topic(bootstrap, partitions)
    await send_one_each(bootstrap, topic, agents, "before")
    child = start_child([sys.executable, __file__, "--child", bootstrap, "--topic", topic, "--agents", str(agents)])
    try:
        assert child.stdout is not None
        line = await asyncio.to_thread(child.stdout.readline)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
    host = Host(bootstrap, topic, agents, "host-2", commit=True)
    t0 = time.perf_counter()
    await host.start()
    ok = await host.until(agents, 60)
    took = time.perf_counter() - t0
    result = {
        "backend": "kafka(tansu)", "case": "kill -9 of a host, a new host joins the group", "agents": agents,
        "child_said": line.decode().strip(), "rejoin_and_redeliver_s": round(took, 3), "all_arrived": ok,
        "redelivered": host.total, "per_agent_counts": sorted(set(host.inboxes.values())),
    }
    await host.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--kill9", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child_host(args.child, args.topic, args.agents[0]))
        return
    server = TansuServer()
    try:
        server.start()
        for agents in args.agents:
            for run in range(args.runs):
                job = (kill9_run(server.bootstrap, agents, args.partitions) if args.kill9
                       else one_run(server.bootstrap, agents, args.partitions))
                print(json.dumps({"run": run + 1, **asyncio.run(job)}), flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
