"""The A2A operations, one core each, shared by both bindings.

The JSON-RPC binding (:mod:`.routes`) and the HTTP+JSON binding (:mod:`.rest`)
only parse their requests into the SDK's request messages, call one method of
:class:`Operations` and write what it returns (a protobuf message or a JSON
object) or the ``A2AError`` it raises as their binding says. Streams are
:class:`Stream`: a Task snapshot, then ``(seq, event)`` pairs (None for a
heartbeat); errors that happen before the stream starts are raised by the
method, so each binding answers them as an error response, not a stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeAlias
from uuid import UUID

from a2a.types import (
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetTaskPushNotificationConfigRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    ListTaskPushNotificationConfigsResponse,
    ListTasksRequest,
    SendMessageRequest,
    SendMessageResponse,
    StreamResponse,
    SubscribeToTaskRequest,
    Task,
    TaskPushNotificationConfig,
)
from a2a.utils.constants import VERSION_HEADER
from a2a.utils.errors import TaskNotFoundError, UnsupportedOperationError, VersionNotSupportedError
from a2a.utils.task import validate_history_length, validate_page_size
from fastapi import Request
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message as Proto

from squadbus.service.a2a.listing import list_tasks
from squadbus.service.a2a.mapping import TaskView
from squadbus.service.a2a.tasks import EdgeOptions, TaskService, fold, load, parse_task_id
from squadbus.service.a2a.webhooks import WebhookPolicy
from squadbus.service.auth import Principal
from squadbus.service.routes_sse import resume_cursor
from squadbus.service.state import Service
from squadbus.store.base import StoredMessage

AGENT_META = "squadbus.agent_id"
"""The metadata key naming the agent of a SendMessage at the squad interface."""

Result: TypeAlias = Proto | dict[str, Any]


def check_version(request: Request) -> None:
    """``A2A-Version`` (header, or query parameter, §3.6.1): another major version than 1 is refused."""
    version = request.headers.get(VERSION_HEADER) or request.query_params.get(VERSION_HEADER)
    if version and not version.startswith("1."):
        raise VersionNotSupportedError(f"A2A version {version} is not supported (this edge speaks 1.0)")


def json_of(result: Result) -> dict[str, Any]:
    """A result as the JSON both bindings send (camelCase; dicts are already JSON)."""
    if isinstance(result, dict):
        return result
    body: dict[str, Any] = MessageToDict(result, preserving_proto_field_name=False)
    return body


@dataclass
class Stream:
    """A stream's Task snapshot, then its events; :meth:`items` closes the events when the consumer stops."""

    snapshot: Task
    events: AsyncIterator[tuple[int, StreamResponse] | None]

    async def items(self) -> AsyncIterator[tuple[int | None, StreamResponse] | None]:
        """``(None, Task)`` first, then ``(seq, event)``; None for a heartbeat."""
        yield None, StreamResponse(task=self.snapshot)
        # closed with the response (client gone, send timeout): the hub viewer leaves at once
        async with contextlib.aclosing(self.events) as events:  # type: ignore[type-var]
            async for item in events:
                yield item


class Operations:
    """The A2A operations of one request: the squad interface (``agent_id`` None) or one agent's."""

    def __init__(self, service: Service, options: EdgeOptions, who: Principal, agent_id: str | None,
                 request: Request) -> None:
        self.service = service
        self.tasks = TaskService(service, options, WebhookPolicy.of(service.settings.a2a_webhook_allow))
        self.who = who
        self.agent_id = agent_id
        self.request = request

    def _target(self, req: SendMessageRequest) -> str | None:
        if self.agent_id is not None:
            return self.agent_id
        for source in (req.message.metadata, req.metadata):
            if AGENT_META in source:
                return str(source[AGENT_META])
        return None

    async def _load(self, task_id: UUID) -> TaskView:
        view, _ = await load(self.service, task_id, self.who)
        return view

    async def send_message(self, req: SendMessageRequest) -> SendMessageResponse:
        """SendMessage: the task once terminal or interrupted (``send_wait`` s at most) or at once."""
        validate_history_length(req.configuration)
        task_id, _ = await self.tasks.send(req, self.who, self.request, self._target(req))
        view = await self._load(task_id)
        if not req.configuration.return_immediately and not view.final_for_stream:
            await self.tasks.wait_final(task_id, view.last_seq, view)
            view = await self._load(task_id)
        length = req.configuration.history_length if req.configuration.HasField("history_length") else None
        return SendMessageResponse(task=view.task(length))

    async def get_task(self, req: GetTaskRequest) -> Task:
        """GetTask with ``historyLength``."""
        validate_history_length(req)
        view = await self._load(parse_task_id(req.id))
        return view.task(req.history_length if req.HasField("history_length") else None)

    async def list_tasks(self, req: ListTasksRequest) -> dict[str, Any]:
        """ListTasks: one page as JSON (``nextPageToken`` always there; no ``artifacts`` unless asked)."""
        validate_history_length(req)
        if req.HasField("page_size"):
            validate_page_size(req.page_size)
        listed = await list_tasks(self.service, req, self.who, self.agent_id)
        body: dict[str, Any] = MessageToDict(listed, preserving_proto_field_name=False,
                                             always_print_fields_with_no_presence=True)
        for task in body["tasks"]:
            if not req.include_artifacts:
                task.pop("artifacts", None)
            if not task.get("history"):
                task.pop("history", None)
        return body

    async def cancel_task(self, req: CancelTaskRequest) -> Task:
        """CancelTask (idempotent: a repeat returns the canceled task)."""
        return await self.tasks.cancel(parse_task_id(req.id), self.who, self.request)

    async def create_push(self, config: TaskPushNotificationConfig) -> TaskPushNotificationConfig:
        """CreateTaskPushNotificationConfig (the URL must pass the webhook policy)."""
        return await self.tasks.set_push(config, self.who, self.request)

    async def get_push(self, req: GetTaskPushNotificationConfigRequest) -> TaskPushNotificationConfig:
        """GetTaskPushNotificationConfig: an unknown config id is TaskNotFoundError."""
        task_id = parse_task_id(req.task_id)
        found = (await self.tasks.push_configs(task_id, self.who)).get(req.id)
        if found is None:
            raise TaskNotFoundError(f"task {task_id} has no push notification config {req.id!r}")
        return found.to_proto(task_id)

    async def list_push(self, req: ListTaskPushNotificationConfigsRequest) -> dict[str, Any]:
        """ListTaskPushNotificationConfigs: every active config of the task."""
        task_id = parse_task_id(req.task_id)
        found = await self.tasks.push_configs(task_id, self.who)
        response = ListTaskPushNotificationConfigsResponse(configs=[c.to_proto(task_id) for c in found.values()])
        body: dict[str, Any] = MessageToDict(response, preserving_proto_field_name=False,
                                             always_print_fields_with_no_presence=True)
        return body

    async def delete_push(self, req: DeleteTaskPushNotificationConfigRequest) -> dict[str, Any]:
        """DeleteTaskPushNotificationConfig (idempotent)."""
        await self.tasks.delete_push(parse_task_id(req.task_id), req.id, self.who, self.request)
        return {}

    async def extended_card(self, _req: Any) -> dict[str, Any]:
        """GetExtendedAgentCard: the cards declare none."""
        raise UnsupportedOperationError("this edge has no extended agent card")

    def _resume(self) -> int | None:
        last_event_id = self.request.headers.get("Last-Event-ID")
        return resume_cursor(last_event_id, None) if last_event_id else None

    async def send_streaming(self, req: SendMessageRequest) -> Stream:
        """SendStreamingMessage: the Task, then its events (resumed after ``Last-Event-ID`` when given)."""
        resume = self._resume()
        task_id, seq = await self.tasks.send(req, self.who, self.request, self._target(req))
        _, rows = await load(self.service, task_id, self.who)
        return self._stream(task_id, rows, seq if resume is None else resume)

    async def subscribe(self, req: SubscribeToTaskRequest) -> Stream:
        """SubscribeToTask: a final task without ``Last-Event-ID`` is UnsupportedOperationError."""
        resume = self._resume()
        task_id = parse_task_id(req.id)
        view, rows = await load(self.service, task_id, self.who)
        if resume is None and view.terminal:
            raise UnsupportedOperationError(f"task {task_id} is already final: read it with GetTask")
        return self._stream(task_id, rows, view.last_seq if resume is None else resume)

    def _stream(self, task_id: UUID, rows: list[StoredMessage], after: int) -> Stream:
        """The Task as of seq ``after``, then the events after it. The rows may go further (a fast agent
        answered before they were read): a snapshot of them all would show a state the events then bring
        again, so the snapshot stops where the events start."""
        start = fold(task_id, rows, upto=after)
        return Stream(start.task(), self.tasks.events(task_id, after, start))
