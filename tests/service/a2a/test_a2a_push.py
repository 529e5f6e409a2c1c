"""Push notifications: the a2a-push consumer group POSTs every task event to its webhooks, retries, dead-letters.

The service runs in this process (uvicorn, memory bus, SQLite file) with a
fast backoff, the webhook is a second small server here that fails on demand,
and the A2A side is the a2a-sdk client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from a2a.client import ClientConfig, ClientFactory
from a2a.types import (
    DeleteTaskPushNotificationConfigRequest,
    GetTaskPushNotificationConfigRequest,
    ListTaskPushNotificationConfigsRequest,
    Message,
    Part,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    TaskPushNotificationConfig,
)
from a2a.utils.errors import TaskNotFoundError
from fastapi import FastAPI, Request, Response

from squadbus.core.settings import Settings
from squadbus.service import ServiceOptions, create_app
from squadbus.service.a2a.routes import install
from squadbus.service.a2a.tasks import EdgeOptions
from tests.service.a2a.agents import run_agents
from tests.service.conftest import served


@dataclasses.dataclass
class Hooks:
    """Webhook receivers: ``/flaky`` answers 503 to its first ``fail_first`` POSTs, ``/down`` always 500,
    ``/redirect`` a 307 to ``/flaky``."""

    fail_first: int = 2
    calls: dict[str, int] = dataclasses.field(default_factory=dict)
    received: list[tuple[str, dict[str, Any], dict[str, str]]] = dataclasses.field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/{name}")
        async def hook(name: str, request: Request) -> Response:
            self.calls[name] = self.calls.get(name, 0) + 1
            if name == "redirect":
                return Response(status_code=307, headers={"Location": "/flaky"})
            if name == "down" or (name == "flaky" and self.calls[name] <= self.fail_first):
                return Response(status_code=503 if name == "flaky" else 500)
            self.received.append((name, await request.json(), dict(request.headers)))
            return Response(status_code=204)

        return app


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[tuple[str, str, Hooks]]:
    """(edge URL, webhook URL, hooks): the service with the edge on a fast backoff, agents on its bus."""
    hooks = Hooks()
    settings = Settings(store_url=f"sqlite+aiosqlite:///{tmp_path / 'h.db'}", a2a=False,
                        a2a_webhook_allow=("127.0.0.1",))  # the webhooks are on loopback
    app = create_app(settings, options=ServiceOptions(audit_path=str(tmp_path / "audit.jsonl"), heartbeat=0.5,
                                                      poll_interval=0.5))
    install(app, EdgeOptions(push_attempts=3, push_backoff_base=0.05, push_backoff_max=0.2))
    async with served(hooks.app()) as hook_url, served(app) as url:
        await run_agents(app.state.service.bus)
        async with httpx.AsyncClient() as c:
            for _ in range(500):
                if len((await c.get(url + "/.well-known/agent-card.json")).json()["skills"]) == 3:
                    break
                await asyncio.sleep(0.02)
        yield url, hook_url, hooks


async def until(check: Any, what: str) -> None:
    """Wait until ``await check()`` is true (a deadline for a hung test only, never a measured time)."""
    for _ in range(1000):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


async def test_push_retries_then_delivers_and_dead_letters(stack: tuple[str, str, Hooks]) -> None:
    url, hook_url, hooks = stack
    async with httpx.AsyncClient(timeout=30) as h:
        factory = ClientFactory(ClientConfig(httpx_client=h, streaming=False))
        echo = await factory.create_from_url(url + "/a2a/agents/echo")
        assert echo._card.capabilities.push_notifications  # type: ignore[attr-defined]
        config = TaskPushNotificationConfig(url=hook_url + "/flaky", token="tok-1")
        request = SendMessageRequest(
            message=Message(message_id=str(uuid.uuid4()), role=Role.ROLE_USER, parts=[Part(text="hi")]),
            configuration=SendMessageConfiguration(task_push_notification_config=config))
        [event] = [e async for e in echo.send_message(request)]
        task_id = event.task.id

        async def completed_pushed() -> bool:
            return any(body.get("statusUpdate", {}).get("status", {}).get("state") == "TASK_STATE_COMPLETED"
                       for _, body, _ in hooks.received)
        await until(completed_pushed, "the completed event reached the webhook")
        assert hooks.calls["flaky"] >= hooks.fail_first + 2  # the first POSTs failed and were retried
        seqs = sorted({int(body["statusUpdate"]["metadata"]["squadbus.seq"]) for _, body, _ in hooks.received})
        states = {body["statusUpdate"]["status"]["state"] for _, body, _ in hooks.received}
        assert states == {"TASK_STATE_WORKING", "TASK_STATE_COMPLETED"} and len(seqs) == 2
        assert all(body["statusUpdate"]["taskId"] == task_id for _, body, _ in hooks.received)
        assert all(headers["x-a2a-notification-token"] == "tok-1" for _, _, headers in hooks.received)

        # the config methods
        created = await echo.create_task_push_notification_config(
            TaskPushNotificationConfig(task_id=task_id, url=hook_url + "/other", token="tok-2"))
        assert created.id and created.task_id == task_id
        listed = (await echo.list_task_push_notification_configs(
            ListTaskPushNotificationConfigsRequest(task_id=task_id))).configs
        assert sorted((c.url, c.token) for c in listed) == [(hook_url + "/flaky", "tok-1"),
                                                            (hook_url + "/other", "tok-2")]
        got = await echo.get_task_push_notification_config(
            GetTaskPushNotificationConfigRequest(task_id=task_id, id=created.id))
        assert got.url == hook_url + "/other"
        for config in listed:
            for _ in range(2):  # idempotent
                await echo.delete_task_push_notification_config(
                    DeleteTaskPushNotificationConfigRequest(task_id=task_id, id=config.id))
        assert not (await echo.list_task_push_notification_configs(
            ListTaskPushNotificationConfigsRequest(task_id=task_id))).configs
        with pytest.raises(TaskNotFoundError):
            await echo.get_task_push_notification_config(
                GetTaskPushNotificationConfigRequest(task_id=task_id, id=created.id))

        # a webhook that stays down: push_attempts POSTs, then a dead letter of group a2a-push (kept, counted)
        slow = await factory.create_from_url(url + "/a2a/agents/slow")
        request = SendMessageRequest(
            message=Message(message_id=str(uuid.uuid4()), role=Role.ROLE_USER, parts=[Part(text="x")]),
            configuration=SendMessageConfiguration(
                return_immediately=True, task_push_notification_config=TaskPushNotificationConfig(
                    url=hook_url + "/down")))
        [event] = [e async for e in slow.send_message(request)]

        async def dead_lettered() -> bool:
            r = await h.get(url + "/v1/dead-letters", params={"group": "a2a-push"})
            return bool(r.json()["items"])
        await until(dead_lettered, "a dead letter of group a2a-push")
        assert hooks.calls["down"] == 3  # the slow agent's one "working", three attempts
        [dead] = (await h.get(url + "/v1/dead-letters", params={"group": "a2a-push"})).json()["items"]
        assert "HTTP 500" in str(dead) and dead["message"]["task_execution_id"] == event.task.id

        async def counted() -> bool:
            metrics = (await h.get(url + "/metrics")).text
            return 'squadbus_dead_letters_total{group="a2a-push"} 1.0' in metrics
        await until(counted, "the dead letter in /metrics")
