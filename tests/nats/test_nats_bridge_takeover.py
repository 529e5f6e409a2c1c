"""``squadbus bridge`` from a NATS source killed with SIGKILL mid-way (issue 17 item 1, NATS half).

The dead bridge holds read, unacknowledged messages on the source's durable consumer; JetStream
gives them back only after ``ack_wait`` (30 s here). The restarted bridge must take them over
before anything newer, so every execution lands in the destination in publish order, and
nothing is lost.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from squadbus.backends.nats import NatsBackend
from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, durable_name
from squadbus.core.bus import Bus
from squadbus.testing.conformance import Collector, eventually
from squadbus.testing.servers.nats import NatsServer

pytestmark = pytest.mark.nats

EXECUTIONS = 4
BACKLOG = 100  # per execution, before the first bridge starts
AFTER = 50  # per execution, sent while the bridge is dead and after it restarted
ACK_WAIT = 30.0
SQUADBUS = str(Path(sys.executable).parent / "squadbus")


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[NatsServer, NatsServer]]:
    """A source and a destination server of their own, stopped by PID at the end."""
    with NatsServer(tmp_path / "source") as source, NatsServer(tmp_path / "destination") as destination:
        yield source, destination


async def start_bridge(source: str, destination: str, group: str, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            SQUADBUS, "bridge", "--from", source, "--to", destination, "--group", group, "--from-start",
            "--ack-wait", str(ACK_WAIT), stdout=out, stderr=out,
        )


async def stop(proc: asyncio.subprocess.Process, sig: int) -> None:
    if proc.returncode is None:
        proc.send_signal(sig)
    try:
        await asyncio.wait_for(proc.wait(), 20)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def stored(bus: Bus) -> int:
    backend = bus.backend
    assert isinstance(backend, NatsBackend)
    info = await backend.js.stream_info(backend.settings.stream)
    return info.state.messages


async def test_a_bridge_killed_mid_way_keeps_every_execution_in_order(
    servers: tuple[NatsServer, NatsServer], tmp_path: Path
) -> None:
    source_server, destination_server = servers
    group = "bridge"
    executions = [uuid.uuid4() for _ in range(EXECUTIONS)]
    log = tmp_path / "bridge.log"
    async with Bus.from_url(source_server.url) as source, Bus.from_url(destination_server.url) as destination:

        async def send(n: int) -> None:
            for execution in executions:
                await source.send("pm", "dev-1", f"{execution}:{n}", task_execution_id=execution)

        for n in range(BACKLOG):
            await send(n)
        first = await start_bridge(source_server.url, destination_server.url, group, log)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while await stored(destination) < EXECUTIONS * BACKLOG // 3:
                assert loop.time() < deadline, f"the first bridge copies nothing:\n{log.read_text()}"
                await asyncio.sleep(0.01)
        finally:
            await stop(first, signal.SIGKILL)
        backend = source.backend
        assert isinstance(backend, NatsBackend)
        consumer = await backend.js.consumer_info(backend.settings.stream, durable_name(group, subjects.ALL))
        assert consumer.num_ack_pending, "the killed bridge held unacknowledged messages"
        held = consumer.num_ack_pending

        for n in range(BACKLOG, BACKLOG + AFTER // 2):  # while no bridge runs
            await send(n)
        second = await start_bridge(source_server.url, destination_server.url, group, log)
        try:
            for n in range(BACKLOG + AFTER // 2, BACKLOG + AFTER):  # while it takes over
                await send(n)
            total = EXECUTIONS * (BACKLOG + AFTER)
            counts: list[int] = []

            async def all_stored() -> bool:
                counts.append(await stored(destination))
                return counts[-1] >= total

            deadline = asyncio.get_running_loop().time() + ACK_WAIT + 30
            while not await all_stored():
                assert asyncio.get_running_loop().time() < deadline, f"stored {counts[-1]} of {total}"
                await asyncio.sleep(0.05)
        finally:
            await stop(second, signal.SIGTERM)
        for execution in executions:
            got = [m.content async for _, m in destination.replay(execution)]
            want = [f"{execution}:{n}" for n in range(BACKLOG + AFTER)]
            assert sorted(set(got)) == sorted(want), f"lost or extra messages of {execution}"
            assert got == want, (
                f"execution out of order in the destination after the bridge died holding {held}: "
                f"first difference at {next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)}"
            )


async def test_take_over_brings_back_a_dead_members_messages_first_with_their_counts(nats_url: str) -> None:
    """A member died holding 20 messages (interleaved in the stream with another agent's, which the
    group's filter skips); with take_over the next member gets those 20 first, in stream order, as
    second attempts, then the newer ones, without waiting for ack_wait."""
    group, agent, other = f"g-{uuid.uuid4().hex[:8]}", f"a-{uuid.uuid4().hex[:8]}", f"o-{uuid.uuid4().hex[:8]}"
    pattern = subjects.direct(agent)
    options = ConsumerOptions(ack_wait=ACK_WAIT, take_over=True)
    async with Bus.from_url(nats_url) as bus:
        backend = bus.backend
        assert isinstance(backend, NatsBackend)
        first = Collector()
        sub = await bus.subscribe(pattern, first, group=group, options=options)  # creates the consumer
        await bus.unsubscribe(sub)
        held = []
        for i in range(20):
            held.append(await bus.send("pm", agent, f"held-{i}"))
            await bus.send("pm", other, f"other-{i}")
        dead = Client()
        await dead.connect(nats_url)
        try:
            pull = await dead.jetstream().pull_subscribe_bind(durable_name(group, pattern), backend.settings.stream)
            got = await pull.fetch(len(held), timeout=5)
            assert len(got) == len(held)
        finally:
            await dead.close()  # dies without acking
        newer = [await bus.send("pm", agent, f"new-{i}") for i in range(10)]
        second = Collector()
        await bus.subscribe(pattern, second, group=group, options=options)
        await eventually(lambda: len(second.messages) >= len(held) + len(newer), ACK_WAIT / 2,
                         "the held and the newer messages, before ack_wait")
        assert second.ids == [m.id for m in held + newer]
        assert [d.attempt for d in second.deliveries] == [2] * len(held) + [1] * len(newer)
