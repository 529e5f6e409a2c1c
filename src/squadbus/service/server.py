"""Connection limits uvicorn lacks: a cap on open connections and a deadline for request headers.

uvicorn (0.55) answers 503 past ``limit_concurrency`` only once a whole
request has arrived, and has no timeout for reading request headers: a
client that opens connections and sends headers a byte at a time
(slowloris) holds a socket each until the process runs out of file
descriptors. The protocol classes here close that gap:

* past ``max_connections`` open connections, a new connection gets an
  immediate ``503`` (``Retry-After: 1``) and is closed before anything is
  read, so the process never runs out of descriptors;
* a connection must deliver a request's complete headers within
  ``header_timeout`` seconds of opening, and of each previous response:
  otherwise it gets ``408`` and is closed. A request being handled (an SSE
  stream, a slow handler) is never cut: the deadline covers headers only.

Both answers are closed gracefully ("lingering close", as Apache and nginx
do): the answer is followed by a FIN, and what the client still sends (the
body of a refused POST, more header bytes) is read and dropped until the
client closes or ``linger`` seconds pass. Closing at once with unread
input makes the kernel reset the connection, and the client then reported
a read error instead of the 503 or 408. At most ``_MAX_LINGERING``
connections of a server linger at a time (each holds a descriptor); past
that, an answer is closed at once as before.

The body is the app's business (``ServiceOptions.body_timeout``, see
:mod:`.limits`). ``squadbus serve`` installs these classes; with plain
uvicorn, pass ``--http squadbus.service.server:GuardedHttpToolsProtocol``
(or ``GuardedH11Protocol``) for the default :class:`ServerLimits`.

:class:`ServiceServer` is the uvicorn ``Server`` of ``squadbus serve``: when
it starts to stop (SIGTERM, Ctrl-C) it ends the app's SSE streams first.
uvicorn's graceful shutdown waits for open responses, and an SSE stream never
ends by itself, so one open dashboard held every stop for the whole graceful
timeout (10 s); the app's lifespan shutdown comes only after that wait.
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_FD_RESERVE = 64  # descriptors kept for the store, the broker, logs and the listening socket
_MAX_LINGERING = _FD_RESERVE // 2  # refused or timed-out connections closing gracefully at once, per server


def default_max_connections() -> int:
    """4096, or fewer when the open-files limit would not allow that many plus a reserve."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(16, min(4096, soft - _FD_RESERVE))


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerLimits:
    """Per-process connection limits (see the module docstring)."""

    max_connections: int = default_max_connections()
    header_timeout: float = 10.0
    linger: float = 2.0  # seconds a 503 or 408 connection keeps dropping input before it is closed

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.header_timeout <= 0 or self.linger < 0:
            raise ValueError("max_connections must be >= 1, header_timeout > 0 and linger >= 0")


def _response(status: str, detail: str, *extra: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    head = [f"HTTP/1.1 {status}", "content-type: application/json", f"content-length: {len(body)}",
            "connection: close", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


REFUSED = _response("503 Service Unavailable", "too many open connections; retry later", "retry-after: 1")
TIMED_OUT = _response("408 Request Timeout", "request headers not received in time")


class _Guard:
    """What both protocol classes add to uvicorn's (mixed in before the uvicorn class)."""

    limits: ServerLimits = ServerLimits()
    _refused = False
    _answered = False  # a 503 or 408 was written: whatever arrives now is dropped
    _header_timer: asyncio.TimerHandle | None = None
    _linger_timer: asyncio.TimerHandle | None = None

    # provided by the uvicorn protocol class this is mixed into
    server_state: Any
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    cycle: Any

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Refuse past the cap, else serve with a deadline for the first request's headers."""
        if len(self.server_state.connections) >= self.limits.max_connections:
            self._refused = True
            assert isinstance(transport, asyncio.Transport)
            self._answer_and_close(transport, REFUSED)
            return
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def data_received(self, data: bytes) -> None:
        """Drop anything a connection sends once it was answered 503 or 408."""
        if not self._answered:
            super().data_received(data)  # type: ignore[misc]

    def eof_received(self) -> None:
        """The client is done (returning None: asyncio closes the transport, ending an answered one's linger)."""
        if not self._answered:
            super().eof_received()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the header deadline and the linger."""
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
            _lingering(self.server_state).discard(self)
        if self._refused:
            return
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        """Start the next request's header deadline (before uvicorn may start a pipelined one)."""
        self._arm()
        super().on_response_complete()  # type: ignore[misc]

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._expire, self.cycle)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self, cycle_when_armed: Any) -> None:
        self._header_timer = None
        # a new cycle means a request's headers arrived in time; a websocket owns the transport now
        if self.cycle is not cycle_when_armed or self.transport.is_closing():
            return
        owner: object = self.transport.get_protocol()
        if owner is not self:
            return
        self._answer_and_close(self.transport, TIMED_OUT)

    def _answer_and_close(self, transport: asyncio.Transport, answer: bytes) -> None:
        """Write ``answer``, then close gracefully (the module docstring says why), or at once past the cap."""
        self._answered = True
        transport.write(answer)
        lingering = _lingering(self.server_state)
        if not self.limits.linger or len(lingering) >= _MAX_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        lingering.add(self)
        self._linger_timer = self.loop.call_later(self.limits.linger, transport.close)


def _lingering(server_state: Any) -> set[_Guard]:
    """The connections of one uvicorn server that are closing gracefully (kept on its shared state)."""
    found: set[_Guard] | None = getattr(server_state, "squadbus_lingering", None)
    if found is None:
        found = server_state.squadbus_lingering = set()
    return found


class GuardedH11Protocol(_Guard, H11Protocol):
    """uvicorn's h11 protocol with :class:`ServerLimits` (defaults)."""


class GuardedHttpToolsProtocol(_Guard, HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`ServerLimits` (defaults)."""


def protocol_class(limits: ServerLimits, *, http: str = "auto") -> type[asyncio.Protocol]:
    """A uvicorn ``http=`` protocol class enforcing ``limits`` (``http``: auto, h11 or httptools)."""
    base: type[_Guard] = GuardedH11Protocol if http == "h11" else GuardedHttpToolsProtocol
    return type(f"{base.__name__}Limited", (base,), {"limits": limits})


def end_sse_streams(app: object) -> None:
    """End the SSE streams of ``app``'s running service, if it is a squadbus app that is running."""
    service = getattr(getattr(app, "state", None), "service", None)
    hub = getattr(service, "hub", None)
    if hub is not None:
        hub.end_streams()


class ServiceServer(uvicorn.Server):
    """uvicorn's ``Server`` that ends the app's SSE streams as its shutdown begins (see the module docstring).

    Each stream sends what it holds and ends its response, so its connection
    closes at once; clients resume with ``Last-Event-ID``.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """End the SSE streams, then uvicorn's graceful shutdown (which no longer waits for them)."""
        end_sse_streams(self.config.app)
        await super().shutdown(sockets)
