"""A2A 0.3 clients: the a2a-sdk's 0.3 JSON-RPC transport (``message/send``, ``tasks/get``, ...) against the edge."""

from __future__ import annotations

import uuid

import httpx
import pytest
from a2a.client import A2ACardResolver
from a2a.compat.v0_3.jsonrpc_transport import CompatJsonRpcTransport
from a2a.types import (
    CancelTaskRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    SendMessageConfiguration,
    SendMessageRequest,
    SubscribeToTaskRequest,
    TaskPushNotificationConfig,
    TaskState,
)
from a2a.utils.errors import TaskNotFoundError, UnsupportedOperationError

from tests.service.a2a.conftest import InProcess
from tests.service.a2a.test_a2a_edge import text_message, texts
from tests.service.conftest import auth

S = TaskState


async def test_a_0_3_client_sends_gets_streams_and_cancels(inproc: InProcess) -> None:
    base = inproc.url + "/a2a/agents/echo"
    async with httpx.AsyncClient(headers=auth("pm"), timeout=30) as h:
        raw = (await h.get(base + "/.well-known/agent-card.json")).json()  # what a 0.3 client reads
        assert (raw["url"], raw["preferredTransport"], raw["protocolVersion"]) == (base + "/jsonrpc", "JSONRPC",
                                                                                    "0.3")
        card = await A2ACardResolver(h, base).get_agent_card()
        echo = CompatJsonRpcTransport(h, card, raw["url"], is_shared_httpx=True)
        sent = await echo.send_message(SendMessageRequest(message=text_message("hi")))
        task = sent.task
        assert task.status.state == S.TASK_STATE_COMPLETED and texts(task)[-1] == (2, "echo: hi")
        got = await echo.get_task(GetTaskRequest(id=task.id, history_length=1))
        assert texts(got) == [(2, "echo: hi")]
        with pytest.raises(TaskNotFoundError):
            await echo.get_task(GetTaskRequest(id=str(uuid.uuid4())))
        await echo.create_task_push_notification_config(
            TaskPushNotificationConfig(task_id=task.id, url="http://127.0.0.1:9/hook"))
        listed = await echo.list_task_push_notification_configs(
            ListTaskPushNotificationConfigsRequest(task_id=task.id))
        assert [c.url for c in listed.configs] == ["http://127.0.0.1:9/hook"]

        slow = CompatJsonRpcTransport(h, card, inproc.url + "/a2a/agents/slow/jsonrpc", is_shared_httpx=True)
        stream = slow.send_message_streaming(SendMessageRequest(message=text_message("think")))
        opened = await anext(stream)
        working = await anext(stream)
        assert working.status_update.status.state == S.TASK_STATE_WORKING
        task_id = opened.task.id if opened.HasField("task") else working.status_update.task_id
        canceled = await slow.cancel_task(CancelTaskRequest(id=task_id))
        assert canceled.status.state == S.TASK_STATE_CANCELED
        assert [e.status_update.status.state async for e in stream] == [S.TASK_STATE_CANCELED]
        with pytest.raises(UnsupportedOperationError):  # final: nothing to resubscribe to
            [e async for e in slow.subscribe(SubscribeToTaskRequest(id=task_id))]
        config = SendMessageConfiguration(return_immediately=True)
        other = await slow.send_message(SendMessageRequest(message=text_message("x"), configuration=config))
        assert other.task.id != task_id


async def test_0_3_errors_and_auth(inproc: InProcess) -> None:
    url = inproc.url + "/a2a/agents/echo/jsonrpc"
    params = {"message": {"messageId": "x1", "role": "user", "kind": "message",
                          "parts": [{"kind": "text", "text": "hi"}]}}
    async with httpx.AsyncClient(timeout=30) as h:
        async def call(method: str, body: object, who: str | None = "pm") -> httpx.Response:
            headers = auth(who) if who else {}
            return await h.post(url, headers=headers, json={"jsonrpc": "2.0", "id": 3, "method": method,
                                                            "params": body})

        assert (await call("tasks/get", {"id": str(uuid.uuid4())}, who=None)).status_code == 401
        assert (await call("message/send", params, who="viewer")).status_code == 403  # as on 1.0
        r = await call("tasks/get", {"id": str(uuid.uuid4())})
        assert r.status_code == 200 and r.json()["error"]["code"] == -32001
        r = await call("message/send", params)
        assert r.json()["result"]["status"]["state"] == "completed"  # 0.3 names its states in lowercase
