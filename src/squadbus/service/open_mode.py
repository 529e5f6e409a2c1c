"""Open mode (no tokens file) serves loopback only, checked by the app itself on every request.

Without tokens every request acts as admin, so two things must hold for each
request, whatever address the server was bound to:

* the peer is on a loopback address: an app started with
  ``uvicorn squadbus.service:create_app --factory --host 0.0.0.0`` and no
  tokens answers 403 to every other machine;
* the ``Host`` header names a loopback host (``localhost``, ``127.0.0.0/8``,
  ``[::1]``, any port): a web page the user visits can make the browser
  resolve its own name to 127.0.0.1 (DNS rebinding), but the browser still
  sends that name as ``Host``, so the request is refused.

With a tokens file this middleware is not installed: tokens decide.
"""

from __future__ import annotations

import ipaddress
import json

from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_NAMES = frozenset({"localhost"})


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 (bracketed or not) and ``localhost``."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_of(header: str) -> str:
    """The host name of a ``Host`` header value, without the port (``[::1]:80`` → ``[::1]``)."""
    if header.startswith("["):
        end = header.find("]")
        return header if end < 0 else header[: end + 1]
    name, _, _port = header.partition(":")
    return name


class LoopbackOnly:
    """ASGI middleware for open mode: 403 unless the peer and the ``Host`` header are loopback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @staticmethod
    def refusal(scope: Scope) -> str | None:
        """Why this request is refused, or None when it may pass."""
        client = scope.get("client")
        if client is None or not is_loopback(str(client[0])):
            return ("this service runs open (no tokens file) and serves loopback clients only; "
                    "give it a tokens file to serve other machines")
        host = next((value for name, value in scope.get("headers", ()) if name == b"host"), None)
        if host is None or not is_loopback(host_of(host.decode("latin-1"))):
            return ("this service runs open (no tokens file) and answers only requests addressed to a loopback "
                    "host (localhost, 127.0.0.1, [::1]); give it a tokens file to serve other host names")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        reason = self.refusal(scope)
        if reason is None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": reason}).encode()
        await send({
            "type": "http.response.start", "status": 403,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        })
        await send({"type": "http.response.body", "body": body})
