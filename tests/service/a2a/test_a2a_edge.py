"""The A2A edge driven by the a2a-sdk client (ClientFactory, JSON-RPC transport) against a real ``squadbus serve``.

Each test starts the service as a uvicorn child process on Redis with a
SQLite file; the squad agents answer on the bus from the test process.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from a2a.client import A2ACardResolver, Client, ClientCallContext, ClientConfig, ClientFactory
from a2a.types import (
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    Message,
    Part,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    Task,
    TaskState,
)
from a2a.utils.errors import TaskNotCancelableError, TaskNotFoundError, UnsupportedOperationError

from squadbus.core.bus import Bus
from squadbus.testing.servers.process import kill9
from tests.service.conftest import UvicornProcess, auth

pytestmark = [pytest.mark.redis]

S = TaskState


@asynccontextmanager
async def client_for(url: str, who: str, *, agent: str | None = "echo", streaming: bool = False
                     ) -> AsyncIterator[Client]:
    """An a2a-sdk client of one agent's card (or the squad card), sending ``who``'s bearer token."""
    async with httpx.AsyncClient(headers=auth(who), timeout=30) as h:
        factory = ClientFactory(ClientConfig(httpx_client=h, streaming=streaming))
        base = url if agent is None else f"{url}/a2a/agents/{agent}"
        client = await factory.create_from_url(base)
        yield client


def text_message(text: str, *, message_id: str | None = None, task_id: str = "") -> Message:
    """A user message with one text part."""
    return Message(message_id=message_id or str(uuid.uuid4()), role=Role.ROLE_USER, parts=[Part(text=text)],
                   task_id=task_id)


async def send(client: Client, message: Message, **config: object) -> Task:
    """SendMessage (non-streaming): the Task it returns."""
    request = SendMessageRequest(message=message, configuration=SendMessageConfiguration(**config))  # type: ignore[arg-type]
    events = [e async for e in client.send_message(request)]
    assert len(events) == 1 and events[0].HasField("task"), events
    return events[0].task


def texts(task: Task) -> list[tuple[int, str]]:
    """(role, text) of every history message."""
    return [(m.role, m.parts[0].text) for m in task.history]


def seq_of(event: StreamResponse) -> int:
    """The squadbus seq of a stream event (its SSE id)."""
    body = event.status_update if event.HasField("status_update") else event.artifact_update
    return int(body.metadata["squadbus.seq"])


async def test_card_send_get_list(edge: UvicornProcess, squad: Bus) -> None:
    url = edge.url
    async with httpx.AsyncClient(timeout=10) as h:
        card = await A2ACardResolver(h, url).get_agent_card()
        echo_card = await A2ACardResolver(h, f"{url}/a2a/agents/echo").get_agent_card()
        assert (await h.get(f"{url}/a2a/agents/nobody/.well-known/agent-card.json")).status_code == 404
    assert [(i.url, i.protocol_binding, i.protocol_version) for i in card.supported_interfaces] == [
        (f"{url}/a2a/jsonrpc", "JSONRPC", "1.0"), (f"{url}/a2a/rest", "HTTP+JSON", "1.0"),
        (f"{url}/a2a/jsonrpc", "JSONRPC", "0.3")]
    assert card.security_schemes["bearer"].http_auth_security_scheme.scheme == "Bearer"
    assert "bearer" in card.security_requirements[0].schemes
    assert {s.id for s in card.skills} == {"echo/echo", "asker/chat", "slow/chat"}
    assert card.capabilities.streaming
    assert [i.url for i in echo_card.supported_interfaces] == [f"{url}/a2a/agents/echo/jsonrpc",
                                                               f"{url}/a2a/agents/echo/rest",
                                                               f"{url}/a2a/agents/echo/jsonrpc"]
    assert [s.id for s in echo_card.skills] == ["echo"]

    async with client_for(url, "pm") as pm:
        message_id = str(uuid.uuid4())
        task = await send(pm, text_message("hi", message_id=message_id))
        assert task.status.state == S.TASK_STATE_COMPLETED
        assert task.status.message.parts[0].text == "echo: hi"
        assert texts(task) == [(Role.ROLE_USER, "hi"), (Role.ROLE_AGENT, "on it"), (Role.ROLE_AGENT, "echo: hi")]
        assert task.history[0].message_id == message_id
        # the same messageId again: the same task, nothing sent twice
        again = await send(pm, text_message("hi", message_id=message_id))
        assert again.id == task.id and len(again.history) == 3
        # GetTask with historyLength
        got = await pm.get_task(GetTaskRequest(id=task.id, history_length=1))
        assert texts(got) == [(Role.ROLE_AGENT, "echo: hi")] and got.status.state == S.TASK_STATE_COMPLETED
        assert len((await pm.get_task(GetTaskRequest(id=task.id))).history) == 3
        assert not (await pm.get_task(GetTaskRequest(id=task.id, history_length=0))).history
        with pytest.raises(TaskNotFoundError):
            await pm.get_task(GetTaskRequest(id=str(uuid.uuid4())))
        # input-required, then a follow-up message to the same task
        async with client_for(url, "pm", agent="asker") as asker:
            asked = await send(asker, text_message("paint the door"))
            assert asked.status.state == S.TASK_STATE_INPUT_REQUIRED
            assert asked.status.message.parts[0].text == "which colour?"
            done = await send(asker, text_message("blue", task_id=asked.id))
            assert done.id == asked.id and done.status.state == S.TASK_STATE_COMPLETED
            assert done.status.message.parts[0].text == "painted blue"
        more = [await send(pm, text_message(f"n{i}")) for i in range(2)]

    pm_tasks = [task.id, asked.id, *(t.id for t in more)]
    # ListTasks: cursor pages, scoped by the caller's token
    async with client_for(url, "pm", agent=None) as squad_client:
        first = await squad_client.list_tasks(ListTasksRequest(page_size=3))
        assert first.total_size == 4 and len(first.tasks) == 3 and first.next_page_token
        rest = await squad_client.list_tasks(ListTasksRequest(page_size=3, page_token=first.next_page_token))
        assert len(rest.tasks) == 1 and not rest.next_page_token
        assert [t.id for t in [*first.tasks, *rest.tasks]] == pm_tasks[::-1]  # most recently updated first
        assert not first.tasks[0].history  # ListTasks sends no history unless asked
        with_history = await squad_client.list_tasks(ListTasksRequest(page_size=1, history_length=1))
        assert len(with_history.tasks[0].history) == 1
        done_only = await squad_client.list_tasks(ListTasksRequest(status=S.TASK_STATE_COMPLETED))
        assert len(done_only.tasks) == 4
    async with client_for(url, "dev-1", agent=None) as other_agent:
        assert not (await other_agent.list_tasks(ListTasksRequest())).tasks
        with pytest.raises(TaskNotFoundError):  # another agent's task is not found, not forbidden
            await other_agent.get_task(GetTaskRequest(id=task.id))
    async with client_for(url, "viewer", agent=None) as viewer:
        assert (await viewer.list_tasks(ListTasksRequest())).total_size == 4
    async with client_for(url, "pm", agent="asker") as asker:
        assert [t.id for t in (await asker.list_tasks(ListTasksRequest())).tasks] == [asked.id]


async def test_stream_subscribe_cancel(edge: UvicornProcess, squad: Bus) -> None:
    url = edge.url
    async with client_for(url, "pm", streaming=True) as pm:
        request = SendMessageRequest(message=text_message("stream me"))
        events = [e async for e in pm.send_message(request)]
        assert [e.WhichOneof("payload") for e in events] == ["task", "status_update", "status_update"]
        assert events[0].task.status.state == S.TASK_STATE_SUBMITTED
        assert [e.status_update.status.state for e in events[1:]] == [S.TASK_STATE_WORKING, S.TASK_STATE_COMPLETED]
        assert [seq_of(e) for e in events[1:]] == [2, 3]
        completed = events[0].task.id
        with pytest.raises(TaskNotCancelableError):
            await pm.cancel_task(CancelTaskRequest(id=completed))
        with pytest.raises(UnsupportedOperationError):  # a final task has no stream to join
            [e async for e in pm.subscribe(SubscribeToTaskRequest(id=completed))]

    async with client_for(url, "pm", agent="slow", streaming=True) as pm:
        stream = pm.send_message(SendMessageRequest(message=text_message("think hard")))
        opened = await anext(stream)
        working = await anext(stream)
        assert working.status_update.status.state == S.TASK_STATE_WORKING
        task_id = opened.task.id
        # two more subscribers join from the working event (before or after the cancel: they see the same)
        subscribers = [asyncio.create_task(_collect(pm, task_id, after=seq_of(working))) for _ in range(2)]
        canceled = await pm.cancel_task(CancelTaskRequest(id=task_id))
        assert canceled.status.state == S.TASK_STATE_CANCELED
        again = await pm.cancel_task(CancelTaskRequest(id=task_id))  # idempotent
        assert again.status.state == S.TASK_STATE_CANCELED
        rest = [e async for e in stream]
        assert [e.status_update.status.state for e in rest] == [S.TASK_STATE_CANCELED]
        for seen in await asyncio.gather(*subscribers):
            assert seen[0].HasField("task")
            assert [(seq_of(e), e.status_update.status.state) for e in seen[1:]] == [
                (seq_of(rest[0]), S.TASK_STATE_CANCELED)]
    async with httpx.AsyncClient(headers=auth("pm"), timeout=10) as h:
        r = await h.get(f"{url}/v1/messages", params={"task_execution_id": task_id, "message_type": "a2a.cancel"})
        [cancel] = r.json()["items"]  # one cancel message to the agent, however often CancelTask ran
        assert cancel["recipient_id"] == "slow" and cancel["sender_id"] == "pm"


async def _collect(client: Client, task_id: str, *, after: int) -> list[StreamResponse]:
    context = ClientCallContext(service_parameters={"Last-Event-ID": str(after)})
    return [e async for e in client.subscribe(SubscribeToTaskRequest(id=task_id), context=context)]


async def test_jsonrpc_errors_and_auth(edge: UvicornProcess, squad: Bus) -> None:
    url = edge.url + "/a2a/jsonrpc"
    async with httpx.AsyncClient(timeout=10) as h:
        def call(method: str, params: object, who: str = "pm") -> object:
            return h.post(url, headers=auth(who), json={"jsonrpc": "2.0", "id": 7, "method": method, "params": params})

        assert (await h.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "GetTask"})).status_code == 401
        for method, params, code in [
            ("NoSuchMethod", {}, -32601),
            ("GetTask", {"id": str(uuid.uuid4())}, -32001),
            ("GetTask", {"id": "not-a-uuid"}, -32001),
            ("GetTask", {"id": str(uuid.uuid4()), "historyLength": -1}, -32602),
            ("ListTasks", {"pageSize": 1000}, -32602),
            ("SendMessage", {"message": {"messageId": "m1", "role": "ROLE_USER", "parts": [{"text": "x"}]}}, -32602),
            ("SendMessage", {"message": {"role": "ROLE_USER", "parts": [{"text": "x"}]},
                             "metadata": {"squadbus.agent_id": "echo"}}, -32602),
            ("CreateTaskPushNotificationConfig", {"taskId": "t", "url": "http://127.0.0.1:9/"}, -32001),
            ("GetExtendedAgentCard", {}, -32004),
        ]:
            r = await call(method, params)  # type: ignore[misc]
            assert r.status_code == 200, (method, r.text)
            body = r.json()
            assert body["id"] == 7 and body["error"]["code"] == code, (method, body)
        r = await h.post(url, headers=auth("pm"), content=b"{not json")
        assert r.status_code == 200 and r.json()["error"]["code"] == -32700
        # the squad interface sends to the agent named in the metadata
        r = await call("SendMessage", {"message": {"messageId": "m2", "role": "ROLE_USER", "parts": [{"text": "x"}]},
                                       "metadata": {"squadbus.agent_id": "echo"}})
        assert r.json()["result"]["task"]["status"]["state"] == "TASK_STATE_COMPLETED"
        # webhooks on loopback are refused by default (this service has no SQUADBUS_A2A_WEBHOOK_ALLOW)
        refused = await call("CreateTaskPushNotificationConfig",  # type: ignore[misc]
                             {"taskId": r.json()["result"]["task"]["id"], "url": "http://127.0.0.1:9/hook"})
        assert refused.json()["error"]["code"] == -32602 and "loopback" in refused.json()["error"]["message"]
        listed = (await call("ListTasks", {}))  # type: ignore[misc]
        result = listed.json()["result"]
        assert result["nextPageToken"] == "" and result["totalSize"] == 1
        assert "artifacts" not in result["tasks"][0] and "history" not in result["tasks"][0]
        # a viewer reads but does not send
        r = await call("SendMessage", {"message": {"messageId": "m3", "role": "ROLE_USER", "parts": [{"text": "x"}]},
                                       "metadata": {"squadbus.agent_id": "echo"}}, who="viewer")
        assert r.status_code == 403


async def test_resubscribe_after_restart_has_no_gap(edge: UvicornProcess, squad: Bus) -> None:
    """Events published while the service is down reach a SubscribeToTask resumed with Last-Event-ID."""
    async with client_for(edge.url, "pm", agent="slow", streaming=True) as pm:
        stream = pm.send_message(SendMessageRequest(message=text_message("long job")))
        task_id = (await anext(stream)).task.id
        assert seq_of(await anext(stream)) == 2  # the slow agent's "thinking"
        await squad.send("slow", "pm", "step 1", "progress", task_execution_id=task_id)
        step1 = await anext(stream)
        assert step1.status_update.status.message.parts[0].text == "step 1"
        last = seq_of(step1)
        await stream.aclose()
    kill9(edge.proc)  # no graceful shutdown
    edge.proc = None
    await squad.send("slow", "pm", "step 2", "progress", task_execution_id=task_id)
    await squad.send("slow", "pm", "all done", "result", task_execution_id=task_id)
    edge.start()
    async with client_for(edge.url, "pm", agent="slow", streaming=True) as pm:
        resumed = ClientCallContext(service_parameters={"Last-Event-ID": str(last)})
        events = [e async for e in pm.subscribe(SubscribeToTaskRequest(id=task_id), context=resumed)]
        assert events[0].HasField("task")
        updates = events[1:]
        assert [seq_of(e) for e in updates] == [last + 1, last + 2]
        assert [e.status_update.status.message.parts[0].text for e in updates] == ["step 2", "all done"]
        assert updates[-1].status_update.status.state == S.TASK_STATE_COMPLETED
        final = await pm.get_task(GetTaskRequest(id=task_id))
        assert [t for _, t in texts(final)] == ["long job", "thinking", "step 1", "step 2", "all done"]
