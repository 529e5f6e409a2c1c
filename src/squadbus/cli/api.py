"""A small client of a running squadbus service's HTTP API, for the CLI (standard library only).

The CLI talks to a service when the squad lives in another process: ``send``
posts ``/v1/messages``, ``history`` pages ``GET /v1/messages``, ``tail``
follows ``GET /v1/events`` (SSE) and resumes it with ``Last-Event-ID`` when the
connection drops. It needs no extra: a plain ``pip install squadbus`` can
reach a service. Every failure is an :class:`ApiError` whose text is one line.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.client import HTTPException, HTTPResponse
from typing import Any

from squadbus.core.errors import SquadbusError

SERVICE_HEADER = "X-Squadbus-Version"
"""The header a squadbus service's ``/healthz`` carries (``squadbus.service.app.SERVICE_HEADER``)."""

DEFAULT_LOCAL_API = "http://127.0.0.1:8000"
"""Where ``squadbus serve`` listens by default: the CLI looks there when the bus is ``memory://``."""

PROBE_TIMEOUT = 3.0
"""How long the CLI waits for ``/healthz``: a port nobody listens on is refused at once, so this
wait is only paid by a busy service, which 0.5 s misjudged as absent on a loaded machine."""
STREAM_TIMEOUT = 60.0  # the service sends a heartbeat every 15 s by default
RECONNECTS = 5


class ApiError(SquadbusError):
    """The service refused a request, or no service answered."""


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One server-sent event: its name, JSON data and id (None when it has none)."""

    event: str
    data: Any
    id: str | None


def probe(base_url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """True when a squadbus service answers ``GET /healthz`` at ``base_url`` within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(f"{base_url.rstrip('/')}/healthz", timeout=timeout) as response:
            return bool(response.status == 200 and response.headers.get(SERVICE_HEADER))
    except (OSError, HTTPException, ValueError):
        return False


def _detail(body: bytes) -> str:
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        return body.decode("utf-8", "replace").strip()[:200]
    if isinstance(detail, list):  # FastAPI's validation errors
        return "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
    return str(detail)


@dataclass(frozen=True, slots=True)
class ApiClient:
    """The HTTP API of one service at ``base_url``, with an optional bearer ``token``."""

    base_url: str
    token: str | None = None
    timeout: float = 30.0

    def _open(self, method: str, path: str, *, body: object = None, query: Mapping[str, object] | None = None,
              headers: Mapping[str, str] | None = None, timeout: float | None = None) -> HTTPResponse:
        url = f"{self.base_url.rstrip('/')}{path}"
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        request = urllib.request.Request(url, method=method, headers=dict(headers or {}))
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        if body is not None:
            request.data = json.dumps(body).encode()
            request.add_header("Content-Type", "application/json")
        try:
            response: HTTPResponse = urllib.request.urlopen(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            with exc:
                raise ApiError(f"the service at {self.base_url} answered {exc.code}: {_detail(exc.read())}") from None
        except (OSError, HTTPException, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(f"no squadbus service answers at {self.base_url} ({reason})") from None
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        with self._open(method, path, **kwargs) as response:
            try:
                return json.loads(response.read())
            except (OSError, HTTPException, ValueError) as exc:
                raise ApiError(f"the service at {self.base_url} sent a broken answer: {exc}") from None

    def send(self, message: Mapping[str, object]) -> dict[str, Any]:
        """``POST /v1/messages``: the stored message (a client-set ``id`` makes a retry harmless)."""
        result: dict[str, Any] = self._json("POST", "/v1/messages", body=message)
        return result

    def history(self, query: Mapping[str, object]) -> dict[str, Any]:
        """``GET /v1/messages``: one page, ``{"items": [...], "next_cursor": ...}``."""
        result: dict[str, Any] = self._json("GET", "/v1/messages", query=query)
        return result

    def events(self, pattern: str, *, start: str = "earliest") -> Iterator[SseEvent]:
        """``GET /v1/events``: matching messages, forever; a dropped stream resumes after the last id."""
        last_id: str | None = None
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            try:
                response = self._open("GET", "/v1/events", query={"pattern": pattern, "start": start},
                                      headers=headers, timeout=STREAM_TIMEOUT)
            except ApiError:
                failures += 1
                if (last_id is None and failures == 1) or failures > RECONNECTS:
                    raise
                time.sleep(min(2.0, 0.2 * failures))
                continue
            with response:
                try:
                    for event in _parse(response):
                        failures = 0
                        if event.id is not None:
                            last_id = event.id
                        yield event
                except (TimeoutError, OSError, HTTPException):
                    pass  # dropped: reconnect below with Last-Event-ID
            failures += 1
            if failures > RECONNECTS:
                raise ApiError(f"the event stream of {self.base_url} keeps dropping")


def _parse(response: HTTPResponse) -> Iterator[SseEvent]:
    kind, data, ident = "message", "", None
    for raw in response:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield SseEvent(kind, json.loads(data), ident)
            kind, data, ident = "message", "", None
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                kind = value
            elif field == "data":
                data = f"{data}\n{value}" if data else value
            elif field == "id":
                ident = value
