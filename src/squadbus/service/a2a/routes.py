"""The A2A HTTP routes: cards, the JSON-RPC 2.0 binding (A2A 1.0) with SSE streaming, and :mod:`.rest`'s routes.

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
Both bindings call the same operations (:mod:`.operations`); the 0.3 JSON-RPC methods
(``message/send``, ``tasks/get``, …) go to the SDK's 0.3 adapter over them (:mod:`.compat`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from a2a.server.request_handlers.response_helpers import build_error_response
from a2a.types import (
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetExtendedAgentCardRequest,
    GetTaskPushNotificationConfigRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    ListTasksRequest,
    SendMessageRequest,
    SubscribeToTaskRequest,
    TaskPushNotificationConfig,
)
from a2a.utils.errors import (
    A2AError,
    InternalError,
    InvalidParamsError,
    InvalidRequestError,
    JSONParseError,
    MethodNotFoundError,
)
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf.json_format import ParseDict, ParseError
from google.protobuf.message import Message as Proto

from squadbus.core.errors import SquadbusError
from squadbus.service.a2a import cards, compat, rest
from squadbus.service.a2a.mapping import TaskView, to_json
from squadbus.service.a2a.operations import Operations, Result, Stream, check_version, json_of
from squadbus.service.a2a.push import PushSender
from squadbus.service.a2a.registry import AgentRegistry
from squadbus.service.a2a.tasks import EdgeOptions, rows_of
from squadbus.service.a2a.webhooks import WebhookPolicy
from squadbus.service.auth import Principal, reader
from squadbus.service.sse_response import SseResponse
from squadbus.service.state import Service, ServiceDep

logger = logging.getLogger("squadbus.service.a2a")

RequestId = str | int | None
Unary = Callable[[Operations, Any], Awaitable[Result]]
Streaming = Callable[[Operations, Any], Awaitable[Stream]]

UNARY: dict[str, tuple[type[Proto], Unary]] = {
    "SendMessage": (SendMessageRequest, Operations.send_message),
    "GetTask": (GetTaskRequest, Operations.get_task),
    "ListTasks": (ListTasksRequest, Operations.list_tasks),
    "CancelTask": (CancelTaskRequest, Operations.cancel_task),
    "CreateTaskPushNotificationConfig": (TaskPushNotificationConfig, Operations.create_push),
    "GetTaskPushNotificationConfig": (GetTaskPushNotificationConfigRequest, Operations.get_push),
    "ListTaskPushNotificationConfigs": (ListTaskPushNotificationConfigsRequest, Operations.list_push),
    "DeleteTaskPushNotificationConfig": (DeleteTaskPushNotificationConfigRequest, Operations.delete_push),
    "GetExtendedAgentCard": (GetExtendedAgentCardRequest, Operations.extended_card),
}
"""Each JSON-RPC method: its params message and the operation (:mod:`.operations`) that answers it."""
STREAMING: dict[str, tuple[type[Proto], Streaming]] = {
    "SendStreamingMessage": (SendMessageRequest, Operations.send_streaming),
    "SubscribeToTask": (SubscribeToTaskRequest, Operations.subscribe),
}


def _parse(params: Any, into: Proto) -> Any:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidParamsError("params must be an object")
    try:
        return ParseDict(params, into, ignore_unknown_fields=True)
    except (ParseError, TypeError, ValueError) as exc:
        raise InvalidParamsError(f"invalid params: {exc}") from None


def _error(request_id: RequestId, error: A2AError) -> JSONResponse:
    if isinstance(error, JSONParseError):  # the SDK's helper has no model for -32700
        body = {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": error.message}}
        return JSONResponse(body, status_code=200)
    return JSONResponse(build_error_response(request_id, error), status_code=200)


class Edge:
    """The JSON-RPC binding of the squad (``agent_id`` None) or of one agent: parse, call the operation, answer."""

    def __init__(self, service: Service, options: EdgeOptions, who: Principal, agent_id: str | None) -> None:
        self.service = service
        self.options = options
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
            ops = Operations(self.service, self.options, self.who, self.agent_id, request)
            if compat.is_v03(method):  # an A2A 0.3 client (message/send, tasks/get, ...)
                response: Response = await compat.handle(ops, request, request_id, method, body)
                return response
            check_version(request)
            params = body.get("params")
            if method in STREAMING:
                message_type, streaming = STREAMING[method]
                stream = await streaming(ops, _parse(params, message_type()))
                return SseResponse(_frames(request_id, stream), send_timeout=self.service.options.sse_send_timeout)
            if method not in UNARY:
                raise MethodNotFoundError(f"method {method!r} not found")
            message_type, unary = UNARY[method]
            result = await unary(ops, _parse(params, message_type()))
            return JSONResponse({"jsonrpc": "2.0", "id": request_id, "result": json_of(result)})
        except A2AError as exc:
            return _error(request_id, exc)
        except (SquadbusError, OSError) as exc:
            logger.warning("A2A request failed: %s", exc)
            return _error(request_id, InternalError(f"the squad could not answer: {exc}"))


async def _frames(request_id: RequestId, stream: Stream) -> AsyncIterator[bytes]:
    """SSE frames whose data are JSON-RPC responses, ``id: <seq>`` on events; a failure ends with an error."""
    try:
        async for item in stream.items():
            if item is None:
                yield b": keepalive\n\n"
                continue
            seq, event = item
            data = json.dumps({"jsonrpc": "2.0", "id": request_id, "result": to_json(event)}, separators=(",", ":"))
            head = b"" if seq is None else b"id: %d\n" % seq
            yield head + b"data: " + data.encode() + b"\n\n"
    except (SquadbusError, OSError) as exc:
        logger.warning("A2A stream failed: %s", exc)
        error = build_error_response(request_id, InternalError(f"the stream failed: {exc}; resume with Last-Event-ID"))
        yield b"data: " + json.dumps(error, separators=(",", ":")).encode() + b"\n\n"


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
                            timeout=options.push_timeout,
                            webhooks=WebhookPolicy.of(service.settings.a2a_webhook_allow))
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

    r.include_router(rest.router(options))
    return r


def install(app: FastAPI, options: EdgeOptions | None = None) -> None:
    """Mount the A2A edge on ``app``."""
    app.include_router(router(options or EdgeOptions()))


__all__ = ["Edge", "TaskView", "install", "router", "rows_of"]
