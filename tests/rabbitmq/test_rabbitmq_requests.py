"""Request/reply with direct reply-to (backends/rabbitmq/requests.py): no queue per request or requester,
replies matched by correlation id, late replies dropped, close and connection loss fail what waits."""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid

import pytest

from squadbus.backends.rabbitmq.requests import REPLY_PREFIX, DirectReplies
from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery, Requester
from squadbus.core.bus import REPLY_TO, Bus
from squadbus.core.errors import BackendError, Closed, ConnectionLost, RequestTimeout
from squadbus.testing.conformance import Collector, eventually
from squadbus.testing.servers.rabbitmq import RabbitServer

pytestmark = pytest.mark.rabbitmq


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _queues(server: RabbitServer) -> set[str]:
    listing = server.ctl("list_queues", "name", "--quiet", "--no-table-headers")
    return {line.strip() for line in listing.splitlines() if line.strip()}


async def test_requests_get_their_own_replies_and_declare_no_queue(
    rabbitmq_server: RabbitServer, rabbitmq_url: str,
) -> None:
    agent = _uid("agent")
    async with Bus.from_url(rabbitmq_url) as responder_bus, Bus.from_url(rabbitmq_url) as bus:
        async def answer(delivery: Delivery) -> None:
            number = int(delivery.message.content)
            await asyncio.sleep((number % 5) * 0.01)  # replies come back out of request order
            await responder_bus.reply(delivery.message, agent, f"re {number}")

        await responder_bus.subscribe(subjects.direct(agent), answer, group=_uid("g"),
                                     options=ConsumerOptions(max_in_flight=20))
        before = await asyncio.to_thread(_queues, rabbitmq_server)
        sequential = [await bus.request("pm", agent, str(i), timeout=20) for i in range(10)]
        concurrent = await asyncio.gather(*(bus.request("pm", agent, str(i), timeout=20) for i in range(10, 40)))
        after = await asyncio.to_thread(_queues, rabbitmq_server)
    assert [r.content for r in [*sequential, *concurrent]] == [f"re {i}" for i in range(40)]
    assert after == before, "no queue was declared for the requests or the requester"
    assert isinstance(bus.backend, Requester)


async def test_a_late_reply_is_dropped_and_logged_and_the_next_request_gets_its_own(
    rabbitmq_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    agent = _uid("agent")
    timed_out = asyncio.Event()
    async with Bus.from_url(rabbitmq_url) as responder_bus, Bus.from_url(rabbitmq_url) as bus:
        late_sent = asyncio.Event()

        async def answer(delivery: Delivery) -> None:
            if delivery.message.content == "slow":
                await timed_out.wait()
                await responder_bus.reply(delivery.message, agent, "too late")
                late_sent.set()
            else:
                await responder_bus.reply(delivery.message, agent, "on time")

        await responder_bus.subscribe(subjects.direct(agent), answer, group=_uid("g"),
                                     options=ConsumerOptions(max_in_flight=2))
        with caplog.at_level(logging.DEBUG, logger="squadbus.backends.rabbitmq"):
            with pytest.raises(RequestTimeout):
                await bus.request("pm", agent, "slow", timeout=0.5)
            timed_out.set()
            await late_sent.wait()
            reply = await bus.request("pm", agent, "fast", timeout=20)
            await eventually(lambda: "dropping reply" in caplog.text, 20, "the late reply's log line")
    assert reply.content == "on time"
    dropped = [r for r in caplog.records if "dropping reply" in r.getMessage()]
    assert dropped and all(r.levelno == logging.DEBUG for r in dropped)


_RESPONDER = """
import asyncio, sys
from squadbus.core import subjects
from squadbus.core.bus import Bus

async def main(url, agent):
    async with Bus.from_url(url) as bus:
        async def answer(delivery):
            await bus.reply(delivery.message, agent, delivery.message.content.upper())
        await bus.subscribe(subjects.direct(agent), answer, group="responders")
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_a_reply_from_another_process_comes_back_directly(rabbitmq_url: str) -> None:
    agent = _uid("agent")
    responder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _RESPONDER, rabbitmq_url, agent, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE)
    try:
        assert responder.stdout is not None
        assert await asyncio.wait_for(responder.stdout.readline(), 30) == b"ready\n"
        async with Bus.from_url(rabbitmq_url) as bus:
            seen = Collector()
            await bus.subscribe(subjects.direct(agent), seen)  # the request as stored and routed
            reply = await bus.request("pm", agent, "status?", timeout=20)
            await eventually(lambda: len(seen.messages) == 1, 20, "the request on its subject")
    finally:
        await asyncio.wait_for(responder.communicate(b""), 30)  # closing its stdin ends it
    assert reply.content == "STATUS?" and reply.sender_id == agent
    assert seen.messages[0].headers[REPLY_TO].startswith(REPLY_PREFIX)


async def test_closing_the_bus_fails_a_pending_request_with_closed(rabbitmq_url: str) -> None:
    silent = _uid("silent")
    async with Bus.from_url(rabbitmq_url) as bus:
        got = Collector()
        await bus.subscribe(subjects.direct(silent), got, group=_uid("g"))
        pending = asyncio.ensure_future(bus.request("pm", silent, "anyone?", timeout=120))
        await eventually(lambda: len(got.messages) == 1, 20, "the request at the silent agent")
    with pytest.raises(Closed):
        await pending


async def test_a_lost_connection_fails_the_pending_request_and_the_next_one_works(
    rabbitmq_server: RabbitServer, rabbitmq_url: str,
) -> None:
    agent = _uid("agent")
    async with Bus.from_url(rabbitmq_url) as responder_bus, Bus.from_url(rabbitmq_url) as bus:
        held = asyncio.Event()

        async def answer(delivery: Delivery) -> None:
            if delivery.message.content == "hold":
                held.set()
                return  # no reply: the request waits while its connection goes
            await responder_bus.reply(delivery.message, agent, "ok")

        await responder_bus.subscribe(subjects.direct(agent), answer, group=_uid("g"))
        assert (await bus.request("pm", agent, "first", timeout=20)).content == "ok"
        pending = asyncio.ensure_future(bus.request("pm", agent, "hold", timeout=120))
        await asyncio.wait_for(held.wait(), 20)
        await asyncio.to_thread(rabbitmq_server.ctl, "close_all_connections", "test: connection lost")
        with pytest.raises(ConnectionLost):
            await pending
        await eventually(lambda: bus.backend.connected and responder_bus.backend.connected, 20, "the reconnects")
        reply = await bus.request("pm", agent, "after", timeout=20)
    assert reply.content == "ok"


async def test_a_request_after_a_failed_reply_consumer_start_opens_a_new_one(
    rabbitmq_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent = _uid("agent")
    probe = DirectReplies._probe
    calls: list[int] = []

    async def fails_once(self: DirectReplies, raw: object) -> str:
        calls.append(1)
        if len(calls) == 1:
            raise BackendError("the probe came back without an address")
        return await probe(self, raw)  # type: ignore[arg-type]

    monkeypatch.setattr(DirectReplies, "_probe", fails_once)
    async with Bus.from_url(rabbitmq_url) as responder_bus, Bus.from_url(rabbitmq_url) as bus:
        async def answer(delivery: Delivery) -> None:
            await responder_bus.reply(delivery.message, agent, "ok")

        await responder_bus.subscribe(subjects.direct(agent), answer, group=_uid("g"))
        with pytest.raises(BackendError, match="without an address"):
            await bus.request("pm", agent, "first", timeout=20)
        reply = await bus.request("pm", agent, "second", timeout=20)
    assert reply.content == "ok"
