"""The bridge keeps each execution's order in the destination while the destination fails.

Redis source → a destination server of the test's own (NATS, or a second redis-server),
a producer sending steadily over several executions while the destination is stopped for a
few seconds and started again on the same port and store, or frozen with SIGSTOP past its
publish timeout: copies that fail must not let later messages of their execution land
first, nothing may be lost, and a retried copy must not be stored twice.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from squadbus.core.backend import StartFrom
from squadbus.core.bus import Bus
from squadbus.core.errors import BackendError
from squadbus.testing.servers.nats import NatsServer
from squadbus.testing.servers.redis import RedisServer
from squadbus.workers.bridge import Bridge

pytestmark = [pytest.mark.redis, pytest.mark.nats, pytest.mark.slow]

EXECUTIONS = 4
RATE = 200.0  # messages per second, over all executions
BEFORE = 1.0  # seconds of sending before the destination fails
DOWN = 3.0  # seconds the destination is stopped or frozen (past its publish timeout of 1 s)
AFTER = 1.5  # seconds of sending after it is back
# Short timeouts so a copy to the missing destination fails within the outage.
OPTIONS = {
    "nats": "publish_timeout=1&ack_timeout=0.5&connect_timeout=1",
    "redis": "profile=durable&publish_timeout=1&connect_timeout=1",
}


class Destination:
    """A destination server the test can stop and start again on the same port and store."""

    def __init__(self, kind: str, directory: Path) -> None:
        self.kind = kind
        self.server: NatsServer | RedisServer
        if kind == "nats":
            self.server = NatsServer(directory)
        else:
            directory.mkdir(parents=True)
            self.server = RedisServer("durable", directory=directory)
        self.server.start()

    @property
    def url(self) -> str:
        prefix = "" if self.kind == "nats" else f"prefix=d{uuid.uuid4().hex[:8]}&"
        return f"{self.server.url}?{prefix}{OPTIONS[self.kind]}"

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.server.proc is not None
        return self.server.proc

    def outage(self, how: str) -> Callable[[], object]:
        """Take the server away; returns what brings it back."""
        if how == "restart":
            self.server.stop()
            return self.server.start
        proc = self.proc
        proc.send_signal(signal.SIGSTOP)
        return lambda: proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.server.proc is not None and self.server.proc.poll() is None:
            self.server.proc.send_signal(signal.SIGCONT)
        self.server.stop()


@pytest.fixture(params=["nats", "redis"])
def destination_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Destination]:
    destination = Destination(request.param, tmp_path / "destination")
    try:
        yield destination
    finally:
        destination.close()


def first_difference(got: list[str], want: list[str]) -> int:
    return next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))


def stored_late(got: list[str], want: list[str]) -> int:
    """How many messages were stored after a message sent later than them (order violations)."""
    position = {content: i for i, content in enumerate(want)}
    latest, late = -1, 0
    for content in got:
        if position[content] < latest:
            late += 1
        latest = max(latest, position[content])
    return late


async def stored(bus: Bus, executions: list[uuid.UUID]) -> dict[uuid.UUID, list[str]]:
    """Each execution's contents as the destination replays them (nothing while it cannot answer:
    the first call after a restart may find its pooled connection closed)."""
    try:
        return {e: [m.content async for _, m in bus.replay(e)] for e in executions}
    except BackendError:
        return {e: [] for e in executions}


@pytest.mark.parametrize("how", ["restart", "sigstop"])
async def test_each_execution_keeps_its_order_in_the_destination_across_an_outage(
    redis_url: str, destination_server: Destination, how: str
) -> None:
    group = f"bridge-{uuid.uuid4().hex[:8]}"
    executions = [uuid.uuid4() for _ in range(EXECUTIONS)]
    sent: dict[uuid.UUID, list[str]] = {e: [] for e in executions}
    async with Bus.from_url(redis_url) as source, Bus.from_url(destination_server.url) as destination:
        bridge = Bridge(source, destination, group=group, start_from=StartFrom.EARLIEST, ack_wait=30.0)
        await bridge.start()
        loop = asyncio.get_running_loop()

        async def produce(seconds: float) -> None:
            end = loop.time() + seconds
            n = sum(len(v) for v in sent.values())
            while loop.time() < end:
                execution = executions[n % EXECUTIONS]
                content = f"{execution}:{len(sent[execution])}"
                await source.send("pm", "dev-1", content, task_execution_id=execution)
                sent[execution].append(content)
                n += 1
                await asyncio.sleep(1 / RATE)

        try:
            await produce(BEFORE)
            back = destination_server.outage(how)
            try:
                await produce(DOWN)
            finally:
                await asyncio.to_thread(back)
            await produce(AFTER)
            total = sum(len(v) for v in sent.values())
            deadline = loop.time() + 60
            while sum(map(len, (got := await stored(destination, executions)).values())) < total:
                assert loop.time() < deadline, f"destination stored {sum(map(len, got.values()))} of {total}"
                await asyncio.sleep(0.2)
        finally:
            await bridge.stop()
        late = {e: stored_late(got[e], sent[e]) for e in executions}
        for execution in executions:
            got_e, want = got[execution], sent[execution]
            assert sorted(set(got_e)) == sorted(want), f"lost or extra messages of {execution}"
            assert len(got_e) == len(want), f"{len(got_e) - len(want)} messages of {execution} stored twice"
            at = first_difference(got_e, want)
            assert got_e == want, (
                f"{execution} out of order in the destination from position {at} of {len(want)} "
                f"({sum(late.values())} of {total} messages stored after a later one of their execution): "
                f"got {got_e[at:at + 3]}, sent {want[at:at + 3]}"
            )
        assert source.stats.nacked == 0, "the bridge nacked copies instead of holding them"
        assert bridge.copied == total and bridge.outages >= 1


SQUADBUS = str(Path(sys.executable).parent / "squadbus")


async def test_squadbus_bridge_exits_cleanly_on_sigterm_while_the_destination_is_down(
    redis_url: str, tmp_path: Path
) -> None:
    """The CLI waits for a destination that is down; SIGTERM ends it with exit 0, the copy it held
    stays on the source, and the next bridge copies it first."""
    destination_server = Destination("redis", tmp_path / "destination")
    log = tmp_path / "bridge.log"
    execution = uuid.uuid4()
    try:
        destination_url = destination_server.url
        async with Bus.from_url(redis_url) as source, Bus.from_url(destination_url) as destination:
            with log.open("ab") as out:
                proc = await asyncio.create_subprocess_exec(
                    SQUADBUS, "bridge", "--from", redis_url, "--to", destination_url, "--group", "cli",
                    "--from-start", "--retry-max", "0.5", stdout=out, stderr=out,
                )
            try:
                await source.send("pm", "dev-1", "0", task_execution_id=execution)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                while await stored(destination, [execution]) != {execution: ["0"]}:
                    assert loop.time() < deadline, log.read_text()
                    await asyncio.sleep(0.1)
                destination_server.server.stop()
                for i in range(1, 6):
                    await source.send("pm", "dev-1", f"{i}", task_execution_id=execution)
                while "did not store message" not in log.read_text():
                    assert loop.time() < deadline, log.read_text()
                    await asyncio.sleep(0.1)
                proc.send_signal(signal.SIGTERM)
                try:
                    code = await asyncio.wait_for(proc.wait(), 30)
                except TimeoutError:
                    raise AssertionError(f"squadbus bridge ignored SIGTERM:\n{log.read_text()}") from None
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            text = log.read_text()
            assert code == 0, text
            assert "copied 1, skipped 0, retried" in text and "(destination outages: 1)" in text, text
            assert text.count("did not store message") == 1, text
            destination_server.server.start()
            bridge = Bridge(source, destination, group="cli")
            await bridge.start()
            try:
                deadline = loop.time() + 30
                while len((got := await stored(destination, [execution]))[execution]) < 6:
                    assert loop.time() < deadline, got
                    await asyncio.sleep(0.1)
            finally:
                await bridge.stop()
            assert got[execution] == [str(i) for i in range(6)]
    finally:
        destination_server.close()
