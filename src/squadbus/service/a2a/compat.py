"""A2A 0.3 JSON-RPC (``message/send``, ``tasks/get``, …) at the same endpoints, through the SDK's 0.3 adapter.

The SDK's ``JSONRPC03Adapter`` parses a 0.3 request, converts it to the 1.0
request message and calls a ``RequestHandler``; :class:`OperationsHandler`
is that handler over :class:`~.operations.Operations`, which the JSON-RPC
binding puts in the call context of each request (with the caller's token
already checked). So 0.3 clients get the same tasks, scope and errors (as 0.3
codes). What 0.3 lacks here: ListTasks (not a 0.3 method), SSE event ids and
heartbeats on its streams (the adapter writes its own events), so a 0.3
stream cannot be resumed with ``Last-Event-ID``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from a2a.server.context import ServerCallContext
from a2a.server.request_handlers.request_handler import RequestHandler
from a2a.server.routes.common import DefaultServerCallContextBuilder
from a2a.types import (
    AgentCard,
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetExtendedAgentCardRequest,
    GetTaskPushNotificationConfigRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    ListTaskPushNotificationConfigsResponse,
    ListTasksRequest,
    ListTasksResponse,
    Message,
    SendMessageRequest,
    Task,
    TaskArtifactUpdateEvent,
    TaskPushNotificationConfig,
    TaskStatusUpdateEvent,
)
from a2a.utils.errors import UnsupportedOperationError
from fastapi import Request
from google.protobuf.json_format import ParseDict

from squadbus.service.a2a.operations import Operations, Stream
from squadbus.service.a2a.tasks import sender_of

if TYPE_CHECKING:
    from a2a.compat.v0_3.jsonrpc_adapter import JSONRPC03Adapter

OPERATIONS = "squadbus.operations"
"""The call context's state key of the request's :class:`Operations`."""

Event = Task | Message | TaskStatusUpdateEvent | TaskArtifactUpdateEvent
WRITING = frozenset({"message/send", "message/stream", "tasks/cancel", "tasks/pushNotificationConfig/set",
                     "tasks/pushNotificationConfig/delete"})
"""The 0.3 methods that send a message on the squad (viewer tokens may not)."""


def _ops(context: ServerCallContext | None) -> Operations:
    assert context is not None
    ops: Operations = context.state[OPERATIONS]
    return ops


async def _events(stream: Stream) -> AsyncGenerator[Event, None]:
    async for item in stream.items():
        if item is None:
            continue  # 0.3 streams here have no heartbeats
        event = item[1]
        yield getattr(event, str(event.WhichOneof("payload")))


class OperationsHandler(RequestHandler):
    """The SDK's ``RequestHandler`` over the request's :class:`Operations` (taken from the call context)."""

    async def on_get_task(self, params: GetTaskRequest, context: ServerCallContext | None = None) -> Task | None:
        """GetTask."""
        return await _ops(context).get_task(params)

    async def on_list_tasks(self, params: ListTasksRequest,
                            context: ServerCallContext | None = None) -> ListTasksResponse:
        """Not a 0.3 method."""
        raise UnsupportedOperationError("ListTasks is an A2A 1.0 method")

    async def on_cancel_task(self, params: CancelTaskRequest, context: ServerCallContext | None = None) -> Task | None:
        """CancelTask."""
        return await _ops(context).cancel_task(params)

    async def on_message_send(self, params: SendMessageRequest,
                              context: ServerCallContext | None = None) -> Task | Message:
        """SendMessage: the task."""
        return (await _ops(context).send_message(params)).task

    async def on_message_send_stream(self, params: SendMessageRequest,
                                     context: ServerCallContext | None = None) -> AsyncGenerator[Event, None]:
        """SendStreamingMessage: the Task, then its events."""
        async for event in _events(await _ops(context).send_streaming(params)):
            yield event

    async def on_subscribe_to_task(self, params: Any,
                                   context: ServerCallContext | None = None) -> AsyncGenerator[Event, None]:
        """SubscribeToTask (0.3 ``tasks/resubscribe``)."""
        async for event in _events(await _ops(context).subscribe(params)):
            yield event

    async def on_create_task_push_notification_config(
        self, params: TaskPushNotificationConfig, context: ServerCallContext | None = None,
    ) -> TaskPushNotificationConfig:
        """CreateTaskPushNotificationConfig (0.3 ``tasks/pushNotificationConfig/set``)."""
        return await _ops(context).create_push(params)

    async def on_get_task_push_notification_config(
        self, params: GetTaskPushNotificationConfigRequest, context: ServerCallContext | None = None,
    ) -> TaskPushNotificationConfig:
        """GetTaskPushNotificationConfig."""
        return await _ops(context).get_push(params)

    async def on_list_task_push_notification_configs(
        self, params: ListTaskPushNotificationConfigsRequest, context: ServerCallContext | None = None,
    ) -> ListTaskPushNotificationConfigsResponse:
        """ListTaskPushNotificationConfigs."""
        response = ListTaskPushNotificationConfigsResponse()
        ParseDict(await _ops(context).list_push(params), response)
        return response

    async def on_delete_task_push_notification_config(
        self, params: DeleteTaskPushNotificationConfigRequest, context: ServerCallContext | None = None,
    ) -> None:
        """DeleteTaskPushNotificationConfig."""
        await _ops(context).delete_push(params)

    async def on_get_extended_agent_card(
        self, params: GetExtendedAgentCardRequest, context: ServerCallContext | None = None,
    ) -> AgentCard:
        """No extended card."""
        raise UnsupportedOperationError("this edge has no extended agent card")


class _ContextBuilder(DefaultServerCallContextBuilder):
    def build(self, request: Request) -> ServerCallContext:
        context = super().build(request)
        context.state[OPERATIONS] = request.state.a2a_operations
        return context


def adapter() -> JSONRPC03Adapter:
    """The SDK's 0.3 JSON-RPC adapter over :class:`OperationsHandler`."""
    # imported here: importing it before a2a.server.routes is a circular import in the SDK (1.3)
    from a2a.compat.v0_3.jsonrpc_adapter import JSONRPC03Adapter

    return JSONRPC03Adapter(OperationsHandler(), context_builder=_ContextBuilder())


def is_v03(method: str) -> bool:
    """Is ``method`` a 0.3 JSON-RPC method name (``message/send``, ``tasks/get``, …)?"""
    return "/" in method and adapter().supports_method(method)


async def handle(ops: Operations, request: Request, request_id: str | int | None, method: str,
                 body: dict[str, Any]) -> Any:
    """Answer one 0.3 request (a JSON response, or an SSE response for the streaming methods)."""
    if method in WRITING:
        sender_of(ops.who)  # a viewer gets HTTP 403 as on 1.0 (the adapter would make any exception a -32603)
    request.state.a2a_operations = ops
    return await adapter().handle_request(request_id, method, body, request)
