"""The HTTP+JSON (REST) binding of A2A 1.0 (spec §11), beside the JSON-RPC one, on the same operations.

Under the squad's base ``/a2a/rest`` and each agent's ``/a2a/agents/{agent_id}/rest``:

=========================================================  =========================================
``POST /message:send``, ``POST /message:stream``           SendMessage, SendStreamingMessage (SSE)
``GET /tasks/{id}`` (``?historyLength=``)                    GetTask
``GET /tasks`` (``?pageSize=&pageToken=&status=…``)          ListTasks
``POST /tasks/{id}:cancel``                                 CancelTask
``POST /tasks/{id}:subscribe`` (also ``GET``)               SubscribeToTask (SSE)
``POST|GET /tasks/{id}/pushNotificationConfigs``            create / list push notification configs
``GET|DELETE /tasks/{id}/pushNotificationConfigs/{cid}``    get / delete one
``GET /extendedAgentCard``                                  UnsupportedOperationError (none declared)
=========================================================  =========================================

Bodies and results are the protobuf messages as JSON (camelCase), query
parameters their camelCase field names (parsed by the SDK's
``proto_utils.parse_params``). An error is the HTTP status of the spec's table
(§5.4, the SDK's ``A2A_ERROR_MAPPING``) with a ``google.rpc.Status`` body
whose ``details`` carry an ``ErrorInfo`` with the A2A reason (the SDK's
``build_rest_error_payload``), e.g. 404 ``TASK_NOT_FOUND``; authentication
stays 401 and a viewer that sends 403, in the same body shape. Streams send the
``StreamResponse`` JSON as ``data`` with ``id: <seq>`` on every event, so
``Last-Event-ID`` resumes them as on the JSON-RPC binding.

Why not the SDK's own REST server (``create_rest_routes`` over a
``RequestHandler``): its SSE events carry no ids (the resumable-streams
extension needs ``id: <seq>`` and ``Last-Event-ID``), its routes are plain
Starlette routes outside the service's token dependency, and its request
handler would be a third copy of each operation's signature. Its error
mapping and query parsing are used as they are.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, TypeVar

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
)
from a2a.utils.constants import A2A_JSON_MEDIA_TYPE
from a2a.utils.error_handlers import build_rest_error_payload
from a2a.utils.errors import A2AError, InternalError, InvalidParamsError
from a2a.utils.proto_utils import parse_params
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf.json_format import Parse, ParseError
from google.protobuf.message import Message as Proto

from squadbus.core.errors import SquadbusError
from squadbus.service.a2a.cards import AGENT_REST, SQUAD_REST
from squadbus.service.a2a.mapping import to_json
from squadbus.service.a2a.operations import Operations, Result, Stream, check_version, json_of
from squadbus.service.a2a.tasks import EdgeOptions
from squadbus.service.auth import Principal, reader
from squadbus.service.sse_response import SseResponse
from squadbus.service.state import Service, ServiceDep

logger = logging.getLogger("squadbus.service.a2a")

HTTP_STATUS_NAMES = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 413: "INVALID_ARGUMENT",
                     422: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}
Call = Callable[[Operations, Request], Awaitable[Result | Stream]]
P = TypeVar("P", bound=Proto)


async def _body(request: Request, into: P) -> P:
    raw = await request.body()
    if raw.strip():
        try:
            Parse(raw, into, ignore_unknown_fields=True)
        except (ParseError, UnicodeDecodeError, TypeError, ValueError) as exc:
            raise InvalidParamsError(f"invalid request body: {exc}") from None
    return into


def _query(request: Request, into: P) -> P:
    try:
        parse_params(request.query_params, into)
    except (ParseError, TypeError, ValueError) as exc:
        raise InvalidParamsError(f"invalid query parameters: {exc}") from None
    return into


def _error(error: A2AError) -> JSONResponse:
    payload = build_rest_error_payload(error)
    return JSONResponse(payload, status_code=payload["error"]["code"], media_type=A2A_JSON_MEDIA_TYPE)


def _http_error(exc: HTTPException) -> JSONResponse:
    status = HTTP_STATUS_NAMES.get(exc.status_code, "UNKNOWN")
    payload = {"error": {"code": exc.status_code, "status": status, "message": str(exc.detail)}}
    return JSONResponse(payload, status_code=exc.status_code, media_type=A2A_JSON_MEDIA_TYPE,
                        headers=exc.headers)


async def _frames(stream: Stream) -> AsyncIterator[bytes]:
    """SSE frames whose data are ``StreamResponse`` JSON, ``id: <seq>`` on events; a failure is an ``error`` event."""
    try:
        async for item in stream.items():
            if item is None:
                yield b": keepalive\n\n"
                continue
            seq, event = item
            head = b"" if seq is None else b"id: %d\n" % seq
            yield head + b"data: " + json.dumps(to_json(event), separators=(",", ":")).encode() + b"\n\n"
    except (SquadbusError, OSError) as exc:
        logger.warning("A2A stream failed: %s", exc)
        payload = build_rest_error_payload(InternalError(f"the stream failed: {exc}; resume with Last-Event-ID"))
        yield b"event: error\ndata: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _answer(service: Service, request: Request, ops: Operations, call: Call) -> Response:
    try:
        check_version(request)
        result = await call(ops, request)
    except A2AError as exc:
        return _error(exc)
    except HTTPException as exc:
        return _http_error(exc)
    except (SquadbusError, OSError) as exc:
        logger.warning("A2A request failed: %s", exc)
        return _error(InternalError(f"the squad could not answer: {exc}"))
    if isinstance(result, Stream):
        return SseResponse(_frames(result), send_timeout=service.options.sse_send_timeout)
    return JSONResponse(json_of(result), media_type=A2A_JSON_MEDIA_TYPE)


def _task_id(request: Request) -> str:
    return str(request.path_params["id"])


async def _send(ops: Operations, request: Request) -> Result:
    return await ops.send_message(await _body(request, SendMessageRequest()))


async def _stream(ops: Operations, request: Request) -> Stream:
    return await ops.send_streaming(await _body(request, SendMessageRequest()))


async def _get(ops: Operations, request: Request) -> Result:
    get = _query(request, GetTaskRequest())
    get.id = _task_id(request)
    return await ops.get_task(get)


async def _list(ops: Operations, request: Request) -> Result:
    return await ops.list_tasks(_query(request, ListTasksRequest()))


async def _cancel(ops: Operations, request: Request) -> Result:
    cancel = await _body(request, CancelTaskRequest())
    cancel.id = _task_id(request)
    return await ops.cancel_task(cancel)


async def _subscribe(ops: Operations, request: Request) -> Stream:
    return await ops.subscribe(SubscribeToTaskRequest(id=_task_id(request)))


async def _create_push(ops: Operations, request: Request) -> Result:
    config = await _body(request, TaskPushNotificationConfig())
    config.task_id = _task_id(request)
    return await ops.create_push(config)


async def _list_push(ops: Operations, request: Request) -> Result:
    lst = _query(request, ListTaskPushNotificationConfigsRequest())
    lst.task_id = _task_id(request)
    return await ops.list_push(lst)


async def _get_push(ops: Operations, request: Request) -> Result:
    return await ops.get_push(GetTaskPushNotificationConfigRequest(task_id=_task_id(request),
                                                                   id=str(request.path_params["config_id"])))


async def _delete_push(ops: Operations, request: Request) -> Result:
    return await ops.delete_push(DeleteTaskPushNotificationConfigRequest(task_id=_task_id(request),
                                                                         id=str(request.path_params["config_id"])))


async def _extended_card(ops: Operations, _request: Request) -> Result:
    return await ops.extended_card(None)


ROUTES: list[tuple[str, str, Call]] = [
    ("POST", "/message:send", _send),
    ("POST", "/message:stream", _stream),
    ("POST", "/tasks/{id}:cancel", _cancel),  # the ':' routes before /tasks/{id}, which would take them
    ("POST", "/tasks/{id}:subscribe", _subscribe),
    ("GET", "/tasks/{id}:subscribe", _subscribe),
    ("GET", "/tasks/{id}", _get),
    ("GET", "/tasks", _list),
    ("POST", "/tasks/{id}/pushNotificationConfigs", _create_push),
    ("GET", "/tasks/{id}/pushNotificationConfigs", _list_push),
    ("GET", "/tasks/{id}/pushNotificationConfigs/{config_id}", _get_push),
    ("DELETE", "/tasks/{id}/pushNotificationConfigs/{config_id}", _delete_push),
    ("GET", "/extendedAgentCard", _extended_card),
]
"""(HTTP method, path under an interface's base, operation) of the binding (spec §11.3)."""


def router(options: EdgeOptions) -> APIRouter:
    """The REST routes of the squad interface and of every agent's."""
    r = APIRouter(include_in_schema=False)

    def endpoint(call: Call) -> Callable[..., Awaitable[Response]]:
        async def answer(request: Request, service: ServiceDep,
                         who: Annotated[Principal, Depends(reader)]) -> Response:
            agent_id = request.path_params.get("agent_id")
            ops = Operations(service, options, who, None if agent_id is None else str(agent_id), request)
            return await _answer(service, request, ops, call)

        return answer

    for base in (SQUAD_REST, AGENT_REST):
        for method, path, call in ROUTES:
            r.add_api_route(base + path, endpoint(call), methods=[method])
    return r
