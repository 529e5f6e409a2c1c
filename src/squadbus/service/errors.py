"""How squadbus errors become HTTP answers.

* :class:`~squadbus.core.errors.MessageTooLarge` → 413;
* other :class:`~squadbus.core.errors.InvalidMessage` and
  :class:`~squadbus.store.InvalidQuery` → 422, shaped like FastAPI's own
  validation errors (``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}``)
  so the OpenAPI schema holds for every 422;
* a body that is not UTF-8 JSON (FastAPI says 400) → 422 too;
* FastAPI's own 422 is rendered so that any input it echoes can be sent: a
  lone surrogate (``"\\ud800"`` in the JSON) is shown escaped, never a 500;
* a 405 lists in ``Allow`` every method the path has (Starlette names only
  the first route's);
* :class:`~squadbus.core.errors.BackendError` (bus or store unreachable) → 503.

Nothing invalid reaches the bus: messages are built and validated before publishing.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from squadbus.core.errors import BackendError, Closed, InvalidMessage, MessageTooLarge
from squadbus.store.base import InvalidQuery

logger = logging.getLogger("squadbus.service")

FASTAPI_BODY_ERROR = "There was an error parsing the body"


def validation_error(msg: str, *loc: str | int, kind: str = "value_error") -> JSONResponse:
    """A 422 in FastAPI's validation-error shape."""
    return JSONResponse(
        {"detail": [{"loc": list(loc) or ["body"], "msg": msg, "type": kind}]},
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
    )


class LocatedInvalid(InvalidMessage):
    """An InvalidMessage that knows which part of the request it is about."""

    def __init__(self, msg: str, loc: tuple[str | int, ...]) -> None:
        super().__init__(msg)
        self.loc = loc


async def _too_large(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_413_CONTENT_TOO_LARGE)


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    loc = exc.loc if isinstance(exc, LocatedInvalid) else ("body",)
    return validation_error(str(exc), *loc)


async def _invalid_query(request: Request, exc: Exception) -> JSONResponse:
    return validation_error(str(exc), "query")


def sendable(value: Any) -> Any:
    """``value`` (JSON-shaped) with every string made encodable as UTF-8 (lone surrogates as ``\\udXXX``)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {sendable(k): sendable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [sendable(v) for v in value]
    return value


async def _request_invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    detail = sendable(jsonable_encoder(exc.errors()))
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app fully matches on this request's path.

    Asked of the router itself, one method at a time: routes of included
    routers are nested, so reading ``route.methods`` would miss them.
    """
    allowed: list[str] = []
    for method in HTTP_METHODS:
        probe = {"type": "http", "method": method, "path": request.scope["path"],
                 "root_path": request.scope.get("root_path", ""), "headers": []}
        if any(route.matches(probe)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == status.HTTP_400_BAD_REQUEST and exc.detail == FASTAPI_BODY_ERROR:
        # FastAPI's answer to a body that is not UTF-8 JSON: malformed input, so a 422 like any other
        return validation_error("request body is not valid UTF-8 JSON", "body", kind="json_invalid")
    if exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
        allowed = allowed_methods(request)
        if allowed:
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
    return await http_exception_handler(request, exc)


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("%s %s: backend unavailable: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": f"unavailable: {exc}"}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _request_invalid)
    app.add_exception_handler(MessageTooLarge, _too_large)
    app.add_exception_handler(InvalidMessage, _invalid)
    app.add_exception_handler(InvalidQuery, _invalid_query)
    app.add_exception_handler(BackendError, _unavailable)
    app.add_exception_handler(Closed, _unavailable)
