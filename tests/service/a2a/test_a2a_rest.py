"""The HTTP+JSON (REST) binding driven by the a2a-sdk client with its REST transport preferred, and raw HTTP.

The service runs in this process (memory bus, SQLite file, the test tokens):
the binding is HTTP over the same operations as JSON-RPC, whatever the backend.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from a2a.client import Client, ClientCallContext, ClientConfig, ClientFactory
from a2a.client.transports.rest import RestTransport
from a2a.types import (
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetTaskPushNotificationConfigRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    ListTasksRequest,
    SendMessageRequest,
    SubscribeToTaskRequest,
    TaskPushNotificationConfig,
    TaskState,
)
from a2a.utils.constants import TransportProtocol
from a2a.utils.errors import (
    InvalidParamsError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)

from tests.service.a2a.conftest import InProcess
from tests.service.a2a.test_a2a_edge import send, seq_of, text_message, texts
from tests.service.conftest import auth

S = TaskState


@asynccontextmanager
async def rest_client(url: str, who: str, *, agent: str | None = "echo", streaming: bool = False
                      ) -> AsyncIterator[Client]:
    """An a2a-sdk client that prefers HTTP+JSON, from an agent's card (or the squad card)."""
    async with httpx.AsyncClient(headers=auth(who), timeout=30) as h:
        config = ClientConfig(httpx_client=h, streaming=streaming, use_client_preference=True,
                              supported_protocol_bindings=[TransportProtocol.HTTP_JSON, TransportProtocol.JSONRPC])
        base = url if agent is None else f"{url}/a2a/agents/{agent}"
        client = await ClientFactory(config).create_from_url(base)
        transport = client._transport  # type: ignore[attr-defined]
        assert isinstance(transport, RestTransport)
        assert transport.url == f"{base}/rest" if agent is not None else f"{url}/a2a/rest"
        yield client


async def test_rest_send_get_list_cancel_stream(inproc: InProcess) -> None:
    url = inproc.url
    async with rest_client(url, "pm") as pm:
        message_id = str(uuid.uuid4())
        task = await send(pm, text_message("hi", message_id=message_id))
        assert task.status.state == S.TASK_STATE_COMPLETED
        assert texts(task) == [(1, "hi"), (2, "on it"), (2, "echo: hi")]
        assert (await send(pm, text_message("hi", message_id=message_id))).id == task.id  # messageId dedupes
        got = await pm.get_task(GetTaskRequest(id=task.id, history_length=1))
        assert texts(got) == [(2, "echo: hi")]
        with pytest.raises(TaskNotFoundError):
            await pm.get_task(GetTaskRequest(id=str(uuid.uuid4())))
        with pytest.raises(TaskNotCancelableError):
            await pm.cancel_task(CancelTaskRequest(id=task.id))
        with pytest.raises(InvalidParamsError):  # the webhook policy: cloud metadata is not a webhook
            await pm.create_task_push_notification_config(TaskPushNotificationConfig(
                task_id=task.id, url="http://169.254.169.254/latest/meta-data/"))
        config = await pm.create_task_push_notification_config(TaskPushNotificationConfig(
            task_id=task.id, url="http://127.0.0.1:9/hook", token="t"))
        listed = await pm.list_task_push_notification_configs(ListTaskPushNotificationConfigsRequest(task_id=task.id))
        assert [(c.id, c.url) for c in listed.configs] == [(config.id, "http://127.0.0.1:9/hook")]
        got_config = await pm.get_task_push_notification_config(
            GetTaskPushNotificationConfigRequest(task_id=task.id, id=config.id))
        assert got_config.token == "t"
        await pm.delete_task_push_notification_config(
            DeleteTaskPushNotificationConfigRequest(task_id=task.id, id=config.id))
        assert not (await pm.list_task_push_notification_configs(
            ListTaskPushNotificationConfigsRequest(task_id=task.id))).configs

    async with rest_client(url, "pm", agent="slow", streaming=True) as pm:
        with pytest.raises(UnsupportedOperationError):  # a final task has no stream to join
            [e async for e in pm.subscribe(SubscribeToTaskRequest(id=task.id))]
        stream = pm.send_message(SendMessageRequest(message=text_message("think hard")))
        opened = await anext(stream)
        working = await anext(stream)
        assert opened.task.status.state == S.TASK_STATE_SUBMITTED
        assert working.status_update.status.state == S.TASK_STATE_WORKING
        task_id = opened.task.id
        resumed = ClientCallContext(service_parameters={"Last-Event-ID": str(seq_of(working))})
        subscriber = pm.subscribe(SubscribeToTaskRequest(id=task_id), context=resumed)
        assert (await anext(subscriber)).HasField("task")
        canceled = await pm.cancel_task(CancelTaskRequest(id=task_id))
        assert canceled.status.state == S.TASK_STATE_CANCELED
        assert (await pm.cancel_task(CancelTaskRequest(id=task_id))).status.state == S.TASK_STATE_CANCELED
        rest = [e async for e in stream]
        seen = [e async for e in subscriber]
        assert [(seq_of(e), e.status_update.status.state) for e in rest] == [
            (seq_of(working) + 1, S.TASK_STATE_CANCELED)]
        assert [(seq_of(e), e.status_update.status.state) for e in seen] == [
            (seq_of(working) + 1, S.TASK_STATE_CANCELED)]

    async with rest_client(url, "pm", agent=None) as squad:  # the squad interface lists the caller's tasks
        first = await squad.list_tasks(ListTasksRequest(page_size=1))
        assert first.total_size == 2 and [t.id for t in first.tasks] == [task_id] and first.next_page_token
        second = await squad.list_tasks(ListTasksRequest(page_size=1, page_token=first.next_page_token))
        assert [t.id for t in second.tasks] == [task.id] and second.next_page_token == ""
        assert [t.id for t in (await squad.list_tasks(ListTasksRequest(status=S.TASK_STATE_CANCELED))).tasks] == [
            task_id]


def _reason(body: dict[str, Any]) -> tuple[int, str, str]:
    error = body["error"]
    [info] = [d for d in error.get("details", []) if d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"]
    assert info["domain"] == "a2a-protocol.org"
    return error["code"], error["status"], info["reason"]


async def test_rest_errors_are_http_statuses_with_status_bodies(inproc: InProcess) -> None:
    base = inproc.url + "/a2a/rest"
    agent = inproc.url + "/a2a/agents/echo/rest"
    message = {"message": {"messageId": "m1", "role": "ROLE_USER", "parts": [{"text": "x"}]}}
    async with httpx.AsyncClient(headers=auth("pm"), timeout=30) as h:
        done = (await h.post(agent + "/message:send", json=message)).json()["task"]
        assert done["status"]["state"] == "TASK_STATE_COMPLETED"
        for method, path, kwargs, expected in [
            ("GET", f"/tasks/{uuid.uuid4()}", {}, (404, "NOT_FOUND", "TASK_NOT_FOUND")),
            ("GET", "/tasks/not-a-uuid", {}, (404, "NOT_FOUND", "TASK_NOT_FOUND")),
            ("GET", f"/tasks/{done['id']}", {"params": {"historyLength": "-1"}},
             (400, "INVALID_ARGUMENT", "INVALID_PARAMS")),
            ("GET", "/tasks", {"params": {"pageSize": "1000"}}, (400, "INVALID_ARGUMENT", "INVALID_PARAMS")),
            ("GET", "/tasks", {"params": {"pageToken": "nonsense"}}, (400, "INVALID_ARGUMENT", "INVALID_PARAMS")),
            ("POST", f"/tasks/{done['id']}:cancel", {}, (400, "FAILED_PRECONDITION", "TASK_NOT_CANCELABLE")),
            ("POST", f"/tasks/{done['id']}:subscribe", {}, (400, "FAILED_PRECONDITION", "UNSUPPORTED_OPERATION")),
            ("GET", "/extendedAgentCard", {}, (400, "FAILED_PRECONDITION", "UNSUPPORTED_OPERATION")),
            ("POST", "/message:send", {"json": {"message": {**message["message"], "messageId": "m2"}}},
             (400, "INVALID_ARGUMENT", "INVALID_PARAMS")),  # the squad interface: no agent named
            ("POST", "/message:send", {"content": b"{not json"}, (400, "INVALID_ARGUMENT", "INVALID_PARAMS")),
            ("GET", "/tasks", {"headers": {"A2A-Version": "2.0"}},
             (400, "FAILED_PRECONDITION", "VERSION_NOT_SUPPORTED")),
            ("POST", f"/tasks/{done['id']}/pushNotificationConfigs", {"json": {"url": "http://10.0.0.1/x"}},
             (400, "INVALID_ARGUMENT", "INVALID_PARAMS")),
            ("GET", f"/tasks/{done['id']}/pushNotificationConfigs/nope", {}, (404, "NOT_FOUND", "TASK_NOT_FOUND")),
        ]:
            r = await h.request(method, base + path, **kwargs)
            assert r.headers["content-type"].startswith("application/a2a+json"), (path, r.text)
            assert (r.status_code, *_reason(r.json())[1:]) == expected, (method, path, r.text)
            assert r.json()["error"]["code"] == r.status_code
        refused = (await h.post(f"{base}/tasks/{done['id']}/pushNotificationConfigs",
                                json={"url": "http://10.0.0.1/x"})).json()
        assert "10.0.0.1, a private address" in refused["error"]["message"]
        other = (await h.get(f"{inproc.url}/a2a/agents/asker/rest/tasks")).json()  # the agent interface: its tasks
        assert other["tasks"] == [] and other["nextPageToken"] == "" and other["totalSize"] == 0
        listed = (await h.get(base + "/tasks")).json()
        assert [t["id"] for t in listed["tasks"]] == [done["id"]] and "artifacts" not in listed["tasks"][0]
    async with httpx.AsyncClient(timeout=30) as h:
        assert (await h.get(base + "/tasks")).status_code == 401
        r = await h.post(agent + "/message:send", json=message, headers=auth("viewer"))
        assert r.status_code == 403 and r.json()["error"]["status"] == "PERMISSION_DENIED"
        r = await h.get(f"{base}/tasks/{done['id']}", headers=auth("dev-1"))  # another agent's task: not found
        assert r.status_code == 404 and _reason(r.json())[2] == "TASK_NOT_FOUND"
        assert (await h.get(f"{base}/tasks/{done['id']}", headers=auth("viewer"))).json()["id"] == done["id"]
