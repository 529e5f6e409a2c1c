"""The A2A task operations on a running service: send, get, list, cancel, and the event stream of a task.

Everything is read from the history store and written through the same path
as ``POST /v1/messages`` (claim the id, publish, write through), so A2A
traffic is squadbus traffic: durable, replayable, visible in the dashboard.

Idempotency: the squadbus id of a client message is
``uuid5(NAMESPACE, sender + "\\n" + messageId)``; sending the same A2A
``messageId`` again (same caller) returns the task it opened and sends
nothing. A CancelTask message has the id ``uuid5(NAMESPACE, "cancel\\n" +
task id)``: concurrent or repeated cancels store one message.

Scope: viewer and admin tokens (and open mode) see every task; an agent
token sees the tasks it opened and the tasks sent to it. A task out of scope
is reported as not found.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from uuid import UUID, uuid4, uuid5

from a2a.types import (
    SendMessageRequest,
    StreamResponse,
    Task,
    TaskPushNotificationConfig,
    TaskState,
)
from a2a.utils.errors import (
    InternalError,
    InvalidParamsError,
    InvalidRequestError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from fastapi import HTTPException, Request, status
from google.protobuf.json_format import MessageToDict

from squadbus.core import envelope, subjects
from squadbus.core.envelope import Message
from squadbus.core.errors import BackendError, InvalidMessage, InvalidSubject
from squadbus.service.a2a.mapping import (
    CANCEL_TYPE,
    FOLLOW_UP_TYPE,
    OPEN_TYPE,
    PUSH_DELETE_TYPE,
    PUSH_SET_TYPE,
    Entry,
    TaskView,
)
from squadbus.service.a2a.push import PushConfig, configs_of, stored_rows
from squadbus.service.a2a.registry import EDGE_ID, AgentRegistry
from squadbus.service.a2a.webhooks import WebhookPolicy, WebhookRefused
from squadbus.service.auth import Principal, Role
from squadbus.service.routes_messages import claim_in_store, send_all
from squadbus.service.sse_hub import HEARTBEAT_FRAME, ViewerStream
from squadbus.service.state import Service
from squadbus.store.base import StoredMessage

logger = logging.getLogger("squadbus.service.a2a")

NAMESPACE = UUID("6f1c2f8e-4a2b-5d7e-9c3a-a2a0a2a0a2a0")
"""The uuid5 namespace of the squadbus ids derived from A2A message ids."""
CLIENT_ID = "a2a-client"
"""The sender id of A2A clients with an admin token or in open mode (an agent token sends as its agent)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class EdgeOptions:
    """How the A2A edge behaves.

    ``send_wait``: seconds a (non-streaming) SendMessage waits for the task to
    reach a terminal or interrupted state before returning it as it is
    (``returnImmediately`` skips the wait). ``squad_name``: the squad card's name.
    ``push_*``: the ``a2a-push`` group's attempts before a dead letter, backoff
    (``base``·2^(attempt-1) seconds, capped at ``max``) and the POST timeout.
    """

    send_wait: float = 30.0
    squad_name: str = "squadbus squad"
    push_attempts: int = 5
    push_backoff_base: float = 1.0
    push_backoff_max: float = 60.0
    push_timeout: float = 10.0


def sender_of(who: Principal) -> str:
    """The sender id of A2A messages from ``who``; viewers cannot send (403)."""
    if who.role is Role.VIEWER:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "viewer tokens cannot send A2A messages or cancel tasks")
    return who.agent_id if who.role is Role.AGENT and who.agent_id else CLIENT_ID


def in_scope(view: TaskView, who: Principal) -> bool:
    """May ``who`` see this task (see the module docstring)?"""
    if who.role is not Role.AGENT:
        return True
    return who.agent_id in (view.agent_id, view.client_id)


def parse_task_id(raw: str) -> UUID:
    """A task id (a UUID); anything else names no task."""
    try:
        return UUID(raw)
    except (ValueError, TypeError, AttributeError):
        raise TaskNotFoundError(f"no task {raw!r}") from None


async def rows_of(service: Service, task_id: UUID) -> list[StoredMessage]:
    """Every stored message of the execution, by seq."""
    return await stored_rows(service.store, task_id)


def fold(task_id: UUID, rows: list[StoredMessage], upto: int | None = None) -> TaskView:
    """The task of these rows (those with seq <= ``upto`` when given)."""
    view = TaskView(task_id)
    for row in rows:
        if upto is not None and row.seq > upto:
            break
        view.apply(Entry.of_row(row))
    return view


async def load(service: Service, task_id: UUID, who: Principal) -> tuple[TaskView, list[StoredMessage]]:
    """The task and its rows; TaskNotFoundError when it is not an A2A task or out of ``who``'s scope."""
    rows = await rows_of(service, task_id)
    view = fold(task_id, rows)
    if not view.opened or not in_scope(view, who):
        raise TaskNotFoundError(f"no task {task_id}")
    return view, rows


def _text(request: SendMessageRequest) -> tuple[str, list[dict[str, object]]]:
    texts: list[str] = []
    others: list[dict[str, object]] = []
    for part in request.message.parts:
        if part.WhichOneof("content") == "text":
            texts.append(part.text)
        else:
            others.append(MessageToDict(part))
    return "\n".join(texts), others


async def _publish(service: Service, message: Message, request: Request) -> StoredMessage | None:
    """Send ``message`` once (idempotent by id); returns the row already stored under its id, if any."""
    async with service.claims.hold([message.id]):
        existing = await service.store.get(message.id)
        if existing is None:
            try:
                existing = (await claim_in_store(service, [message])).get(message.id)
            except HTTPException as exc:
                raise InvalidRequestError(str(exc.detail)) from None
        if existing is not None:
            return existing
        try:
            [out] = await send_all(service, [message], request)
        except HTTPException as exc:
            raise InvalidRequestError(str(exc.detail)) from None
        except BackendError as exc:
            raise InternalError(f"the bus did not take the message ({exc}); sending the same messageId "
                                "again is safe") from None
        if out.seq is None:
            logger.info("A2A message %s published; the db-writer stores it", message.id)
    return None


class TaskService:
    """The A2A operations of one service (built per request: it holds no state of its own)."""

    def __init__(self, service: Service, options: EdgeOptions, webhooks: WebhookPolicy) -> None:
        self.service = service
        self.options = options
        self.webhooks = webhooks
        self.registry = AgentRegistry(service.store)

    async def send(self, req: SendMessageRequest, who: Principal, request: Request,
                   agent_id: str | None) -> tuple[UUID, int]:
        """Send the client's message (opening a task or continuing one); returns the task id and its seq."""
        sender = sender_of(who)
        m = req.message
        if not m.message_id:
            raise InvalidParamsError("message.messageId is required")
        if not m.parts:
            raise InvalidParamsError("message.parts must not be empty")
        content, others = _text(req)
        squad_id = uuid5(NAMESPACE, f"{sender}\n{m.message_id}")
        existing = await self.service.store.get(squad_id)
        if existing is not None and existing.message.task_execution_id is not None:
            return existing.message.task_execution_id, existing.seq
        if m.task_id:
            task_id = parse_task_id(m.task_id)
            view, _ = await load(self.service, task_id, who)
            if view.terminal:
                raise UnsupportedOperationError(f"task {task_id} is {TaskState.Name(view.state)}: it takes no "
                                                "more messages")
            if m.context_id and m.context_id != view.context_id:
                raise InvalidParamsError(f"task {task_id} belongs to context {view.context_id}, not {m.context_id}")
            target, message_type, context_id = view.agent_id, FOLLOW_UP_TYPE, view.context_id
        else:
            target = agent_id or ""
            if not target:
                raise InvalidParamsError("the squad interface needs message.metadata['squadbus.agent_id'] (or use "
                                         "the agent's own interface, /a2a/agents/<agent_id>/jsonrpc)")
            if await self.registry.get(target) is None:
                raise InvalidParamsError(f"agent {target!r} is not A2A-reachable in this squad")
            task_id, message_type = uuid4(), OPEN_TYPE
            context_id = m.context_id or str(uuid4())
        meta: dict[str, object] = {"message_id": m.message_id, "context_id": context_id}
        if others:
            meta["parts"] = others
        if m.metadata:
            meta["metadata"] = MessageToDict(m.metadata)
        try:
            message = envelope.build(
                subject=subjects.direct(target), sender_id=sender, recipient_id=target, content=content,
                message_type=message_type, task_execution_id=task_id, metadata={"a2a": meta}, id=squad_id,
                max_content_bytes=self.service.settings.max_content_bytes,
            )
            envelope.encode(message)
        except (InvalidMessage, InvalidSubject, TypeError, ValueError) as exc:
            raise InvalidParamsError(f"cannot send this message: {exc}") from None
        if req.configuration.HasField("task_push_notification_config"):
            # stored before the task's first message, so the agent's first answer is pushed already
            await self._set_push(task_id, req.configuration.task_push_notification_config, sender, request)
        stored = await _publish(self.service, message, request)
        if stored is not None and stored.message.task_execution_id is not None:
            return stored.message.task_execution_id, stored.seq
        row = await self.service.store.get(squad_id)
        return task_id, row.seq if row is not None else 0

    async def _set_push(self, task_id: UUID, config: TaskPushNotificationConfig, sender: str,
                        request: Request) -> PushConfig:
        try:
            await self.webhooks.resolve(config.url)
        except WebhookRefused as exc:
            raise InvalidParamsError(f"push notification url refused: {exc}") from None
        if config.task_id and config.task_id != str(task_id):
            raise InvalidParamsError(f"the config names task {config.task_id}, not {task_id}")
        push = PushConfig.from_proto(config, config.id or str(uuid4()))
        message = envelope.build(subject=subjects.direct(EDGE_ID), sender_id=sender, recipient_id=EDGE_ID,
                                 content=push.to_json(), message_type=PUSH_SET_TYPE, task_execution_id=task_id)
        await _publish(self.service, message, request)
        return push

    async def set_push(self, config: TaskPushNotificationConfig, who: Principal,
                       request: Request) -> TaskPushNotificationConfig:
        """CreateTaskPushNotificationConfig: add (or replace, same id) a webhook of the task."""
        task_id = parse_task_id(config.task_id)
        await load(self.service, task_id, who)
        push = await self._set_push(task_id, config, sender_of(who), request)
        return push.to_proto(task_id)

    async def push_configs(self, task_id: UUID, who: Principal) -> dict[str, PushConfig]:
        """The task's webhooks by config id (TaskNotFoundError out of scope)."""
        _, rows = await load(self.service, task_id, who)
        return configs_of(rows)

    async def delete_push(self, task_id: UUID, config_id: str, who: Principal, request: Request) -> None:
        """DeleteTaskPushNotificationConfig: idempotent (deleting an absent config changes nothing)."""
        if config_id not in await self.push_configs(task_id, who):
            return
        message = envelope.build(subject=subjects.direct(EDGE_ID), sender_id=sender_of(who), recipient_id=EDGE_ID,
                                 content=json.dumps({"id": config_id}), message_type=PUSH_DELETE_TYPE,
                                 task_execution_id=task_id)
        await _publish(self.service, message, request)

    async def cancel(self, task_id: UUID, who: Principal, request: Request) -> Task:
        """Cancel: a cancel message to the agent, the task ``canceled``. Repeating it returns the canceled task."""
        view, _ = await load(self.service, task_id, who)
        if view.state == TaskState.TASK_STATE_CANCELED:
            return view.task()
        if view.terminal:
            raise TaskNotCancelableError(f"task {task_id} is already {TaskState.Name(view.state)}")
        sender = sender_of(who)
        message = envelope.build(
            subject=subjects.direct(view.agent_id), sender_id=sender, recipient_id=view.agent_id,
            content=json.dumps({"task_id": str(task_id), "reason": "canceled by the A2A client"}),
            message_type=CANCEL_TYPE, task_execution_id=task_id, id=uuid5(NAMESPACE, f"cancel\n{task_id}"),
        )
        with contextlib.suppress(InvalidRequestError):  # another caller's cancel holds the id: canceled all the same
            await _publish(self.service, message, request)
        view, _ = await load(self.service, task_id, who)
        if view.state != TaskState.TASK_STATE_CANCELED and not view.terminal:
            # published but not yet stored (the db-writer does it): report what was asked
            view.state = TaskState.TASK_STATE_CANCELED
        return view.task()

    async def events(self, task_id: UUID, after: int,
                     start: TaskView) -> AsyncGenerator[tuple[int, StreamResponse] | None, None]:
        """The task's events after seq ``after`` (``start`` is the task folded up to it), then live.

        Yields (seq, event), or None for a heartbeat; ends after the event that
        makes the task terminal or interrupted. Events come from the SSE hub
        (store replay, then live rows), so every subscriber gets the same
        events in the same order.
        """
        if start.final_for_stream:
            return
        hub = self.service.hub
        viewer = await hub.join(task_id)
        try:
            stream = ViewerStream(hub, viewer, after=after, heartbeat=self.service.options.heartbeat)
            async for chunk in stream.frames():
                if chunk == HEARTBEAT_FRAME:
                    yield None
                    continue
                for block in chunk.split(b"\n\n"):
                    data = _message_data(block)
                    if data is None:
                        continue
                    event = start.apply(Entry.of_payload(data))
                    if event is not None:
                        yield start.last_seq, event
                    if start.final_for_stream:
                        return
        finally:
            hub.leave(viewer)

    async def wait_final(self, task_id: UUID, after: int, start: TaskView) -> None:
        """Wait (up to ``send_wait`` seconds) until the task is terminal or interrupted."""
        try:
            async with asyncio.timeout(self.options.send_wait), contextlib.aclosing(
                self.events(task_id, after, start)
            ) as events:
                async for _ in events:
                    pass
        except TimeoutError:
            return


def _message_data(block: bytes) -> dict[str, object] | None:
    """The JSON data of an SSE ``message`` event block of the hub (None for anything else)."""
    kind, data = b"", b""
    for line in block.split(b"\n"):
        if line.startswith(b"event: "):
            kind = line[7:]
        elif line.startswith(b"data: "):
            data = line[6:]
    if kind != b"message" or not data:
        return None
    parsed = json.loads(data)
    return parsed if isinstance(parsed, dict) else None
