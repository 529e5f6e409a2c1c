"""A remote A2A agent (the a2a-sdk server, another process) joins the squad as ``weather`` with ``join()``."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from a2a.client import ClientConfig, ClientFactory
from a2a.types import GetTaskRequest, Part, Role, SendMessageRequest, TaskState
from a2a.types import Message as A2AMessage

from squadbus.core import subjects
from squadbus.core.backend import Delivery
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.core.settings import Settings
from squadbus.service import ServiceOptions, create_app
from squadbus.service.a2a import declare
from squadbus.service.a2a.remote import join
from squadbus.testing.servers.process import free_port, port_open, spawn, stop, wait_until
from tests.service.conftest import served

ROOT = Path(__file__).resolve().parents[3]


class RemoteAgent:
    """``tests/service/a2a/remote_agent.py`` as a child process on a free port (started on demand)."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.proc: object = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        argv = [sys.executable, "-m", "tests.service.a2a.remote_agent", str(self.port)]
        self.proc = proc = spawn(argv, self.log, env=env)
        wait_until(lambda: port_open(self.port), 30, f"remote agent (log {self.log})", proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)  # type: ignore[arg-type]
            self.proc = None


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[RemoteAgent]:
    agent = RemoteAgent(tmp_path / "remote.log")
    try:
        yield agent
    finally:
        agent.stop()


async def until(check: object, what: str) -> None:
    for _ in range(1500):
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


async def test_remote_agent_answers_on_the_bus_after_being_down(remote: RemoteAgent) -> None:
    async with Bus.from_url("memory://") as bus:
        seen: list[Message] = []
        dead: list[Message] = []

        async def to_pm(delivery: Delivery) -> None:
            seen.append(delivery.message)

        async def dead_letters(delivery: Delivery) -> None:
            dead.append(delivery.message)

        await bus.subscribe(subjects.direct("pm"), to_pm)
        await bus.subscribe("agent.dlq.>", dead_letters)
        member = await join(bus, remote.url, "weather", attempts=50, backoff_base=0.05, backoff_max=0.2)
        ghost = await join(bus, f"http://127.0.0.1:{free_port()}", "ghost", attempts=2, backoff_base=0.01)
        try:
            # the remote agent is down: the request waits in the group, retried with backoff
            execution = uuid.uuid4()
            asking = asyncio.create_task(bus.request("pm", "weather", "Paris", timeout=60,
                                                     task_execution_id=execution))
            await until(lambda: member.failures >= 1, "a failed attempt while the remote agent is down")
            remote.start()
            answer = await asking
            assert (answer.sender_id, answer.message_type, answer.content) == ("weather", "reply", "sunny in Paris")
            assert answer.task_execution_id == execution
            assert answer.metadata["a2a"]["state"] == "TASK_STATE_COMPLETED"
            assert [(m.message_type, m.content) for m in seen] == [
                ("working", "looking at the sky"), ("artifact", "sunny in Paris")]
            assert all(m.task_execution_id == execution and m.sender_id == "weather" for m in seen)

            # input-required: the next message of the execution continues the remote task
            seen.clear()
            other = uuid.uuid4()
            await bus.send("pm", "weather", "forecast", task_execution_id=other)
            await until(lambda: len(seen) == 1, "the remote agent's question")
            assert (seen[0].message_type, seen[0].content) == ("input-required", "which city?")
            await bus.send("pm", "weather", "Oslo", task_execution_id=other)
            await until(lambda: any(m.message_type == "reply" for m in seen), "the answer after the input")
            remote_tasks = {m.metadata["a2a"]["remote_task_id"] for m in seen}
            assert len(remote_tasks) == 1  # one remote task across both messages
            assert [m.content for m in seen if m.message_type == "reply"] == ["sunny in Oslo"]

            # a remote agent that never answers: attempts, then a dead letter, not a lost message
            await bus.send("pm", "ghost", "anyone?")
            await until(lambda: dead, "a dead letter of group a2a-join-ghost")
            assert dead[0].subject == "agent.dlq.a2a-join-ghost" and dead[0].content == "anyone?"
            assert ghost.failures == 2
        finally:
            await member.stop()
            await ghost.stop()


@pytest.mark.redis
async def test_cli_join_process(remote: RemoteAgent, redis_url: str, tmp_path: Path) -> None:
    """``squadbus a2a join URL --as weather`` in its own process; a squad agent on the same Redis asks it."""
    remote.start()
    log = tmp_path / "join.log"
    env = {**os.environ, "SQUADBUS_URL": redis_url}
    env.pop("SQUADBUS_TOKENS_FILE", None)
    argv = [str(Path(sys.executable).parent / "squadbus"), "a2a", "join", remote.url, "--as", "weather"]
    proc = spawn(argv, log, env=env)
    try:
        await until(lambda: "answers as weather" in log.read_text(), f"the join process is up (log {log})")
        async with Bus.from_url(redis_url) as bus:
            answer = await bus.request("pm", "weather", "Lisbon", timeout=30)
        assert (answer.sender_id, answer.message_type, answer.content) == ("weather", "reply", "sunny in Lisbon")
    finally:
        stop(proc)
    assert "weather left; 1 messages sent" in log.read_text()


async def test_a2a_client_to_remote_agent_through_the_squad(remote: RemoteAgent, tmp_path: Path) -> None:
    """An A2A client → the squad's edge → the bus → a joined remote A2A agent, and back: one task, kept."""
    remote.start()
    app = create_app(Settings(store_url=f"sqlite+aiosqlite:///{tmp_path / 'h.db'}"),
                     options=ServiceOptions(audit_path=str(tmp_path / "audit.jsonl"), heartbeat=0.5))
    async with served(app) as url:
        bus = app.state.service.bus
        member = await join(bus, remote.url, "weather")
        try:
            await declare(bus, "weather", description="The remote weather agent, via the squad")
            async with httpx.AsyncClient(timeout=30) as h:
                for _ in range(500):
                    if (await h.get(url + "/a2a/agents/weather/.well-known/agent-card.json")).status_code == 200:
                        break
                    await asyncio.sleep(0.02)
                client = await ClientFactory(ClientConfig(httpx_client=h, streaming=True)).create_from_url(
                    url + "/a2a/agents/weather")
                request = SendMessageRequest(message=A2AMessage(
                    message_id=str(uuid.uuid4()), role=Role.ROLE_USER, parts=[Part(text="Rome")]))
                events = [e async for e in client.send_message(request)]
                task_id = events[0].task.id
                final = events[-1].status_update.status
                assert final.state == TaskState.TASK_STATE_COMPLETED
                assert final.message.parts[0].text == "sunny in Rome"
                task = await client.get_task(GetTaskRequest(id=task_id))
                assert [p.text for m in task.history for p in m.parts] == [
                    "Rome", "looking at the sky", "sunny in Rome", "sunny in Rome"]
                assert [a.parts[0].text for a in task.artifacts] == ["sunny in Rome"]
        finally:
            await member.stop()
