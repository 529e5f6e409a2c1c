"""Faults on real brokers, checked by the ledger (issue 17): every send's outcome and every completed
delivery recorded, then lost, duplicates, unknown-but-delivered, per-execution order and redelivery delay.

Each case starts a private broker of its own (it kills or pauses it) and stops it by PID. One round per
case in ``make test``; ``make faults`` runs ``SQUADBUS_FAULT_ROUNDS`` rounds (default 5 there) and writes
every report to ``SQUADBUS_FAULTS_REPORT`` (JSON lines) for docs/reliability.md.

Pass: nothing acknowledged is lost, and nothing the sender was told failed ("not stored") is delivered.
Duplicates are allowed (at-least-once; the db-writer removes them from history); order per execution is
asserted (Redis ordered groups, the default; NATS with ``ordered_groups=true``; Kafka partitions) and the
redelivery delay reported.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus
from squadbus.testing import ledger_consumer
from squadbus.testing.conformance import eventually
from squadbus.testing.ledger import Ledger, Report, append_report
from squadbus.testing.servers.kafka import TansuServer
from squadbus.testing.servers.nats import NatsServer
from squadbus.testing.servers.redis import RedisServer

pytestmark = pytest.mark.slow

ROUNDS = int(os.environ.get("SQUADBUS_FAULT_ROUNDS", "1"))
REPORT = Path(os.environ["SQUADBUS_FAULTS_REPORT"]) if os.environ.get("SQUADBUS_FAULTS_REPORT") else None
ACK_WAIT = 2.0
WAIT = 60.0
# Short group timeouts: with tansu a group's first join takes about session_timeout / 2.
KAFKA_OPTIONS = "partitions=4&idempotence=off&session_timeout_ms=3000&heartbeat_interval_ms=1000"


@dataclass
class Broker:
    """A private broker of one test: its URL and how to hurt it."""

    name: str
    url: str
    pid: Callable[[], int]
    kill9: Callable[[], None]
    start: Callable[[], object]


@pytest.fixture
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    kind = request.param
    if kind == "redis":
        (tmp_path / "redis").mkdir()
        redis = RedisServer("durable", directory=tmp_path / "redis")
        redis.start()
        try:
            yield Broker("redis (durable)", f"{redis.url}?profile=durable&publish_timeout=1&block=0.5",
                         lambda: _pid(redis.proc), redis.kill9, redis.start)
        finally:
            redis.cleanup()
    elif kind == "nats":
        with NatsServer(tmp_path / "nats") as nats:
            yield Broker("nats (file, sync always, ordered groups)",
                         f"{nats.url}?publish_timeout=1&ordered_groups=true",
                         lambda: _pid(nats.proc), nats.kill9, nats.start)
    else:
        with TansuServer() as tansu:
            yield Broker("kafka (tansu, memory)", f"{tansu.url}?{KAFKA_OPTIONS}",
                         lambda: _pid(tansu.proc), tansu.stop, tansu.start)


def _pid(proc: object) -> int:
    pid = getattr(proc, "pid", None)
    assert isinstance(pid, int), "the broker is not running"
    return pid


def _report(report: Report) -> Report:
    append_report(REPORT, report)
    print(report.as_row())  # shown with -s / -rA: the figures of docs/reliability.md
    return report


async def _produce(bus: Bus, ledger: Ledger, agent: str, *, count: int, rate: float, producer: str) -> None:
    """``count`` sends at about ``rate`` per second over 8 executions, outcomes in the ledger."""
    executions = [uuid.uuid4() for _ in range(8)]
    for i in range(count):
        await ledger.send(bus, producer, agent, executions[i % len(executions)])
        await asyncio.sleep(1 / rate)


async def _start_member(url: str, group: str, pattern: str, log: Path, name: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", ledger_consumer.MODULE, url, group, pattern, str(log), name, str(ACK_WAIT))
    await eventually(lambda: (log.exists() and "ready" in log.read_text()) or proc.returncode is not None,
                     WAIT, f"group member {name} to join")
    assert proc.returncode is None, f"member {name} exited with {proc.returncode}"
    return proc


async def _survivor(bus: Bus, ledger: Ledger, group: str, pattern: str) -> None:
    async def handle(delivery: Delivery) -> None:
        await asyncio.sleep(0.01)
        ledger.completed(delivery.message, "survivor", delivery.attempt)

    await bus.subscribe(pattern, handle, group=group, options=ConsumerOptions(ack_wait=ACK_WAIT))


@pytest.mark.parametrize("broker", ["redis", "nats", "kafka"], indirect=True)
async def test_consumer_kill9_in_a_group_of_two(broker: Broker, tmp_path: Path) -> None:
    for round_no in range(ROUNDS):
        report = await _member_fault_run(broker, tmp_path / f"victim-{round_no}.log", "kill")
        assert report.lost == 0, report.lost_ids
        assert report.acknowledged == report.sent
        # One member serves a partition (Redis, Kafka) or the whole group (NATS pinned client) at a time,
        # and takes over what a dead one held before anything newer: executions stay in order.
        assert report.order_violations == 0


@pytest.mark.parametrize("broker", ["redis", "nats", "kafka"], indirect=True)
async def test_consumer_sigstop_past_its_ack_wait(broker: Broker, tmp_path: Path) -> None:
    for round_no in range(ROUNDS):
        report = await _member_fault_run(broker, tmp_path / f"paused-{round_no}.log", "pause")
        assert report.lost == 0, report.lost_ids
        assert report.order_violations == 0


async def _member_fault_run(broker: Broker, log: Path, fault: str) -> Report:
    """Two members of a group, one in a process of its own that is killed (``kill``) or paused past its
    ack wait (``pause``) once it completed 30 messages, while one producer sends 400 at 200/s."""
    ledger, agent, group = Ledger(), f"agent-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    pattern = subjects.direct(agent)
    member = await _start_member(broker.url, group, pattern, log, "victim")
    try:
        async with Bus.from_url(broker.url) as bus:
            await _survivor(bus, ledger, group, pattern)
            producing = asyncio.create_task(_produce(bus, ledger, agent, count=400, rate=200, producer="p"))
            await eventually(lambda: log.read_text().count("\n") > 30 or producing.done(), WAIT,
                             "the member to complete 30 messages")
            if fault == "kill":
                member.kill()
                await member.wait()
            else:
                member.send_signal(signal.SIGSTOP)
                await asyncio.sleep(ACK_WAIT * 2 + 1)
                member.send_signal(signal.SIGCONT)
            await producing
            await eventually(lambda: ledger.acknowledged <= ledger.done() | _done_in(log), WAIT,
                             "every acknowledged message completed by a member")
            await asyncio.sleep(1.0)  # a resumed member settles what it held; late duplicates are counted
    finally:
        if member.returncode is None:
            member.kill()
            await member.wait()
    ledger.load(log)
    what = ("consumer kill -9 in a group of two" if fault == "kill"
            else f"consumer SIGSTOP {ACK_WAIT * 2 + 1:.0f} s (ack wait {ACK_WAIT:.0f} s) in a group of two")
    return _report(ledger.check(what, broker.name))


def _done_in(log: Path) -> set[uuid.UUID]:
    scratch = Ledger()
    scratch.load(log)
    return scratch.done()


async def _broker_fault_run(broker: Broker, fault: str, hurt: Callable[[], object], recover: Callable[[], object],
                            down_for: float) -> Report:
    """Four producers and one group member; ``hurt`` the broker after 1 s, ``recover`` it ``down_for`` later."""
    ledger, agent, group = Ledger(), f"agent-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    async with Bus.from_url(broker.url) as consumer, Bus.from_url(broker.url) as producer:
        await _survivor(consumer, ledger, group, subjects.direct(agent))
        producers = [asyncio.create_task(_produce(producer, ledger, agent, count=300, rate=100, producer=f"p{i}"))
                     for i in range(4)]
        await asyncio.sleep(1.0)
        await asyncio.to_thread(hurt)
        await asyncio.sleep(down_for)
        await asyncio.to_thread(recover)
        await asyncio.gather(*producers)
        await eventually(lambda: ledger.acknowledged <= ledger.done(), WAIT,
                         "every acknowledged message delivered after the fault")
        await asyncio.sleep(0.5)  # late duplicates, if any, are counted
    return _report(ledger.check(fault, broker.name))


@pytest.mark.parametrize("broker", ["redis", "nats"], indirect=True)
async def test_broker_kill9_while_publishing_then_restart(broker: Broker) -> None:
    for _ in range(ROUNDS):
        report = await _broker_fault_run(broker, "broker kill -9 while publishing, restart after 1 s",
                                         broker.kill9, broker.start, 1.0)
        assert report.lost == 0, report.lost_ids
        assert report.failed_delivered == 0, report.failed_delivered_errors
        assert report.failed + report.unknown > 0, "the sends should overlap the outage"


@pytest.mark.parametrize("broker", ["redis", "nats"], indirect=True)
async def test_broker_sigstop_past_the_client_timeout(broker: Broker) -> None:
    for _ in range(ROUNDS):
        report = await _broker_fault_run(
            broker, "broker SIGSTOP 2 s (publish timeout 1 s), SIGCONT",
            lambda: os.kill(broker.pid(), signal.SIGSTOP), lambda: os.kill(broker.pid(), signal.SIGCONT), 2.0)
        assert report.lost == 0, report.lost_ids
        assert report.failed_delivered == 0, report.failed_delivered_errors
