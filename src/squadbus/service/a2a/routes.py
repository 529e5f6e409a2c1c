"""The A2A HTTP routes: cards and the JSON-RPC 2.0 binding (A2A 1.0) with SSE streaming.

* ``GET /.well-known/agent-card.json``: the squad card (no token needed);
* ``GET /a2a/agents/{agent_id}/.well-known/agent-card.json``: one agent's card (404 if not reachable);
* ``POST /a2a/jsonrpc``: the squad's JSON-RPC endpoint (every task of the squad);
* ``POST /a2a/agents/{agent_id}/jsonrpc``: the agent's (SendMessage goes to it; ListTasks lists its tasks).

Methods: ``SendMessage``, ``SendStreamingMessage``, ``GetTask``, ``ListTasks``,
``CancelTask``, ``SubscribeToTask`` and the four push notification config
methods (:mod:`.push` delivers them); ``GetExtendedAgentCard`` answers
``UnsupportedOperationError`` (the cards declare no extended card). Errors travel as the binding says:
HTTP 200 with the JSON-RPC error object (code from the SDK's
``JSON_RPC_ERROR_CODE_MAP``); only authentication is HTTP (401, 403 for a
viewer token that sends). Streams are ``text/event-stream`` whose events are
JSON-RPC responses with ``id: <seq>``; ``Last-Event-ID`` resumes after it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from a2a.server.request_handlers.response_helpers import build_error_response
from a2a.types import (
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetTaskPushNotificationConfigRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    ListTaskPushNotificationConfigsResponse,
    ListTasksRequest,
    ListTasksResponse,
    SendMessageRequest,
    SendMessageResponse,
    StreamResponse,
    SubscribeToTaskRequest,
    TaskPushNotificationConfig,
)
from a2a.utils.constants import VERSION_HEADER
from a2a.utils.errors import (
    A2AError,
    InternalError,
    InvalidParamsError,
    InvalidRequestError,
    JSONParseError,
    MethodNotFoundError,
    TaskNotFoundError,
    UnsupportedOperationError,
    VersionNotSupportedError,
)
from a2a.utils.task import validate_history_length, validate_page_size
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from google.protobuf.message import Message as Proto

from squadbus.core.errors import SquadbusError
from squadbus.service.a2a import cards
from squadbus.service.a2a.mapping import TaskView, to_json
from squadbus.service.a2a.push import PushSender
from squadbus.service.a2a.registry import AgentRegistry
from squadbus.service.a2a.tasks import EdgeOptions, TaskService, fold, load, parse_task_id, rows_of
from squadbus.service.auth import Principal, reader
from squadbus.service.routes_sse import resume_cursor
from squadbus.service.sse_response import SseResponse
from squadbus.service.state import Service, ServiceDep

logger = logging.getLogger("squadbus.service.a2a")

STREAMING = frozenset({"SendStreamingMessage", "SubscribeToTask"})
PUSH_METHODS = frozenset({"CreateTaskPushNotificationConfig", "GetTaskPushNotificationConfig",
                          "ListTaskPushNotificationConfigs", "DeleteTaskPushNotificationConfig"})
AGENT_META = "squadbus.agent_id"

RequestId = str | int | None


def _parse(params: Any, into: Proto) -> Any:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidParamsError("params must be an object")
    try:
        return ParseDict(params, into, ignore_unknown_fields=True)
    except (ParseError, TypeError, ValueError) as exc:
        raise InvalidParamsError(f"invalid params: {exc}") from None


def _result(request_id: RequestId, result: Proto | dict[str, Any]) -> JSONResponse:
    body = result if isinstance(result, dict) else to_json(result)
    return JSONResponse({"jsonrpc": "2.0", "id": request_id, "result": body})


def _list_json(response: ListTasksResponse, *, include_artifacts: bool) -> dict[str, Any]:
    """ListTasks' result: ``nextPageToken`` always present; no ``artifacts`` unless asked, no empty ``history``."""
    body: dict[str, Any] = MessageToDict(response, preserving_proto_field_name=False,
                                         always_print_fields_with_no_presence=True)
    for task in body["tasks"]:
        if not include_artifacts:
            task.pop("artifacts", None)
        if not task.get("history"):
            task.pop("history", None)
    return body


def _error(request_id: RequestId, error: A2AError) -> JSONResponse:
    if isinstance(error, JSONParseError):  # the SDK's helper has no model for -32700
        body = {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": error.message}}
        return JSONResponse(body, status_code=200)
    return JSONResponse(build_error_response(request_id, error), status_code=200)


class Edge:
    """The JSON-RPC endpoint of the squad (``agent_id`` None) or of one agent."""

    def __init__(self, service: Service, options: EdgeOptions, who: Principal, agent_id: str | None) -> None:
        self.service = service
        self.tasks = TaskService(service, options)
        self.who = who
        self.agent_id = agent_id

    async def handle(self, request: Request) -> Response:
        """Parse, check and dispatch one JSON-RPC request (batches are not part of the A2A binding)."""
        request_id: RequestId = None
        try:
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError):
                raise JSONParseError() from None
            if not isinstance(body, dict):
                raise InvalidRequestError("a JSON-RPC request must be an object")
            raw_id = body.get("id")
            if isinstance(raw_id, str | int) and not isinstance(raw_id, bool):
                request_id = raw_id
            elif raw_id is not None:
                raise InvalidRequestError("id must be a string, an integer or null")
            method = body.get("method")
            if body.get("jsonrpc") != "2.0" or not isinstance(method, str):
                raise InvalidRequestError("expected jsonrpc '2.0' and a method name")
            version = request.headers.get(VERSION_HEADER)
            if version and not version.startswith("1."):
                raise VersionNotSupportedError(f"A2A version {version} is not supported (this edge speaks 1.0)")
            params = body.get("params")
            if method in STREAMING:
                return await self.stream(request_id, method, params, request)
            return _result(request_id, await self.call(method, params, request))
        except A2AError as exc:
            return _error(request_id, exc)
        except (SquadbusError, OSError) as exc:
            logger.warning("A2A request failed: %s", exc)
            return _error(request_id, InternalError(f"the squad could not answer: {exc}"))

    async def call(self, method: str, params: Any, request: Request) -> Proto | dict[str, Any]:
        """A non-streaming method's result."""
        if method == "SendMessage":
            req: SendMessageRequest = _parse(params, SendMessageRequest())
            validate_history_length(req.configuration)
            task_id, _ = await self.tasks.send(req, self.who, request, self._target(req))
            view, _ = await load(self.service, task_id, self.who)
            if not req.configuration.return_immediately and not view.final_for_stream:
                await self.tasks.wait_final(task_id, view.last_seq, view)
                view, _ = await load(self.service, task_id, self.who)
            length = req.configuration.history_length if req.configuration.HasField("history_length") else None
            return SendMessageResponse(task=view.task(length))
        if method == "GetTask":
            get: GetTaskRequest = _parse(params, GetTaskRequest())
            validate_history_length(get)
            view, _ = await load(self.service, parse_task_id(get.id), self.who)
            return view.task(get.history_length if get.HasField("history_length") else None)
        if method == "ListTasks":
            lst: ListTasksRequest = _parse(params, ListTasksRequest())
            validate_history_length(lst)
            if lst.HasField("page_size"):
                validate_page_size(lst.page_size)
            listed = await self.tasks.list_tasks(lst, self.who, self.agent_id)
            return _list_json(listed, include_artifacts=lst.include_artifacts)
        if method == "CancelTask":
            cancel: CancelTaskRequest = _parse(params, CancelTaskRequest())
            return await self.tasks.cancel(parse_task_id(cancel.id), self.who, request)
        if method in PUSH_METHODS:
            return await self.push(method, params, request)
        if method == "GetExtendedAgentCard":  # the cards declare extendedAgentCard false
            raise UnsupportedOperationError("this edge has no extended agent card")
        raise MethodNotFoundError(f"method {method!r} not found")

    async def push(self, method: str, params: Any, request: Request) -> Proto | dict[str, Any]:
        """The push notification config methods (the webhooks are served by :mod:`.push`)."""
        tasks = self.tasks
        if method == "CreateTaskPushNotificationConfig":
            config: TaskPushNotificationConfig = _parse(params, TaskPushNotificationConfig())
            return await tasks.set_push(config, self.who, request)
        if method == "ListTaskPushNotificationConfigs":
            lst: ListTaskPushNotificationConfigsRequest = _parse(params, ListTaskPushNotificationConfigsRequest())
            task_id = parse_task_id(lst.task_id)
            found = await tasks.push_configs(task_id, self.who)
            response = ListTaskPushNotificationConfigsResponse(configs=[c.to_proto(task_id) for c in found.values()])
            return MessageToDict(response, preserving_proto_field_name=False,
                                 always_print_fields_with_no_presence=True)
        if method == "GetTaskPushNotificationConfig":
            get: GetTaskPushNotificationConfigRequest = _parse(params, GetTaskPushNotificationConfigRequest())
            task_id = parse_task_id(get.task_id)
            config_found = (await tasks.push_configs(task_id, self.who)).get(get.id)
            if config_found is None:
                raise TaskNotFoundError(f"task {task_id} has no push notification config {get.id!r}")
            return config_found.to_proto(task_id)
        delete: DeleteTaskPushNotificationConfigRequest = _parse(params, DeleteTaskPushNotificationConfigRequest())
        await tasks.delete_push(parse_task_id(delete.task_id), delete.id, self.who, request)
        return {}

    def _target(self, req: SendMessageRequest) -> str | None:
        if self.agent_id is not None:
            return self.agent_id
        for source in (req.message.metadata, req.metadata):
            if AGENT_META in source:
                return str(source[AGENT_META])
        return None

    async def stream(self, request_id: RequestId, method: str, params: Any, request: Request) -> Response:
        """SendStreamingMessage / SubscribeToTask: the Task, then its events as SSE (resumable)."""
        last_event_id = request.headers.get("Last-Event-ID")
        resume = resume_cursor(last_event_id, None) if last_event_id else None
        if method == "SendStreamingMessage":
            req: SendMessageRequest = _parse(params, SendMessageRequest())
            task_id, seq = await self.tasks.send(req, self.who, request, self._target(req))
            view, rows = await load(self.service, task_id, self.who)
            after = seq if resume is None else resume
        else:
            sub: SubscribeToTaskRequest = _parse(params, SubscribeToTaskRequest())
            task_id = parse_task_id(sub.id)
            view, rows = await load(self.service, task_id, self.who)
            if resume is None and view.terminal:
                raise UnsupportedOperationError(f"task {task_id} is already final: read it with GetTask")
            after = view.last_seq if resume is None else resume
        start = fold(task_id, rows, upto=after)
        snapshot = view.task()

        async def frames() -> AsyncIterator[bytes]:
            yield _frame(request_id, StreamResponse(task=snapshot), None)
            # closed with the response (client gone, send timeout): the hub viewer leaves at once
            async with contextlib.aclosing(self.tasks.events(task_id, after, start)) as events:
                async for item in events:
                    if item is None:
                        yield b": keepalive\n\n"
                    else:
                        yield _frame(request_id, item[1], item[0])

        return SseResponse(frames(), send_timeout=self.service.options.sse_send_timeout)


def _frame(request_id: RequestId, event: StreamResponse, seq: int | None) -> bytes:
    data = json.dumps({"jsonrpc": "2.0", "id": request_id, "result": to_json(event)}, separators=(",", ":"))
    head = b"" if seq is None else b"id: %d\n" % seq
    return head + b"data: " + data.encode() + b"\n\n"


def router(options: EdgeOptions) -> APIRouter:
    """The A2A routes (not in the OpenAPI document: A2A clients read the cards instead).

    Its lifespan (inside the app's, once the Service runs) starts the push sender, a member of the
    ``a2a-push`` consumer group, and stops it first on shutdown.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service: Service = app.state.service
        sender = PushSender(service.bus, service.store, attempts=options.push_attempts,
                            backoff_base=options.push_backoff_base, backoff_max=options.push_backoff_max,
                            timeout=options.push_timeout)
        await sender.start()
        try:
            yield
        finally:
            await sender.stop()

    r = APIRouter(tags=["a2a"], include_in_schema=False, lifespan=lifespan)

    def secured(request: Request) -> bool:
        return not request.app.state.tokens.open

    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    @r.get("/.well-known/agent-card.json")
    async def squad_card(request: Request, service: ServiceDep) -> JSONResponse:
        agents = await AgentRegistry(service.store).all()
        return JSONResponse(cards.squad_card(agents, base(request), name=options.squad_name,
                                             secured=secured(request)))

    @r.get("/a2a/agents/{agent_id}/.well-known/agent-card.json")
    async def agent_card(agent_id: str, request: Request, service: ServiceDep) -> JSONResponse:
        entry = await AgentRegistry(service.store).get(agent_id)
        if entry is None:
            raise HTTPException(404, f"agent {agent_id!r} is not A2A-reachable")
        return JSONResponse(cards.agent_card(entry, base(request), secured=secured(request)))

    @r.post(cards.SQUAD_RPC)
    async def squad_rpc(request: Request, service: ServiceDep,
                        who: Annotated[Principal, Depends(reader)]) -> Response:
        return await Edge(service, options, who, None).handle(request)

    @r.post("/a2a/agents/{agent_id}/jsonrpc")
    async def agent_rpc(agent_id: str, request: Request, service: ServiceDep,
                        who: Annotated[Principal, Depends(reader)]) -> Response:
        return await Edge(service, options, who, agent_id).handle(request)

    return r


def install(app: FastAPI, options: EdgeOptions | None = None) -> None:
    """Mount the A2A edge on ``app``."""
    app.include_router(router(options or EdgeOptions()))


__all__ = ["Edge", "TaskView", "install", "router", "rows_of"]
