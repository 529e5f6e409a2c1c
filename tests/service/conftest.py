"""Fixtures of the service tests: apps on SQLite files in tmp dirs, ASGI clients, live uvicorn servers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from squadbus.core.settings import Settings
from squadbus.service import ServiceOptions, create_app
from squadbus.service.state import Service
from squadbus.testing.servers.process import free_port, port_open, spawn, stop, wait_until

TOKENS = {
    "dev-1": {"token": "agent-token-dev-1", "role": "agent", "agent_id": "dev-1"},
    "pm": {"token": "agent-token-pm", "role": "agent", "agent_id": "pm"},
    "viewer": {"token": "viewer-token-1", "role": "viewer"},
    "admin": {"token": "admin-token-1", "role": "admin"},
}


def auth(who: str) -> dict[str, str]:
    """The Authorization header of test principal ``who``."""
    return {"Authorization": f"Bearer {TOKENS[who]['token']}"}


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    """A tokens file with two agents, a viewer and an admin."""
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": list(TOKENS.values())}))
    return path


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """A fresh SQLite file store for one test."""
    return f"sqlite+aiosqlite:///{tmp_path / 'history.db'}"


@pytest.fixture
def options(tmp_path: Path) -> ServiceOptions:
    """Service options for tests: audit log in the tmp dir, fast heartbeats and polls."""
    return ServiceOptions(audit_path=str(tmp_path / "audit.jsonl"), heartbeat=0.3, poll_interval=0.5)


@dataclass
class Api:
    """A running app and an httpx client talking to it over ASGI."""

    app: FastAPI
    client: httpx.AsyncClient

    @property
    def service(self) -> Service:
        """The app's running Service."""
        service: Service = self.app.state.service
        return service


@contextlib.asynccontextmanager
async def asgi(app: FastAPI) -> AsyncIterator[Api]:
    """Run ``app``'s lifespan and give an ASGI client (no streaming: use :func:`served` for SSE)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            yield Api(app, client)


@contextlib.asynccontextmanager
async def served(app: FastAPI) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn in this event loop on a free 127.0.0.1 port; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        if not server.started:
            await task
            raise RuntimeError("uvicorn did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


MakeApp = Callable[..., FastAPI]


@pytest.fixture
def make_app(store_url: str, options: ServiceOptions) -> MakeApp:
    """Build an app on the test's SQLite store; keyword arguments override Settings/ServiceOptions fields."""
    settings_fields = {"url", "store_url", "max_content_bytes", "tokens_file"}

    def make(**overrides: Any) -> FastAPI:
        bus = overrides.pop("bus", None)
        store = overrides.pop("store", None)
        s = {k: overrides.pop(k) for k in list(overrides) if k in settings_fields}
        s.setdefault("store_url", store_url)
        s["tokens_file"] = str(s["tokens_file"]) if s.get("tokens_file") else None
        opts = dataclasses.replace(options, **overrides)
        return create_app(Settings(**s), bus=bus, store=store, options=opts)

    return make


@pytest.fixture
async def api(make_app: MakeApp) -> AsyncIterator[Api]:
    """An open-mode app (no tokens) with all workers, over ASGI."""
    async with asgi(make_app()) as running:
        yield running


@pytest.fixture
async def secure_api(make_app: MakeApp, tokens_file: Path) -> AsyncIterator[Api]:
    """An app that requires the tokens of :data:`TOKENS`, over ASGI."""
    async with asgi(make_app(tokens_file=tokens_file)) as running:
        yield running


def message(sender: str = "pm", execution: uuid.UUID | None = None, **fields: Any) -> dict[str, Any]:
    """A MessageIn body."""
    body: dict[str, Any] = {"sender_id": sender, "recipient_id": "dev-1", "content": "hello"}
    if execution is not None:
        body["task_execution_id"] = str(execution)
    body.update(fields)
    return body


# ---- SSE parsing ---------------------------------------------------------------------------------


@dataclass
class Event:
    """One parsed SSE event."""

    event: str
    data: Any
    id: str | None


async def read_events(response: httpx.Response, count: int, *, timeout: float = 20.0,
                      comments: list[str] | None = None) -> list[Event]:
    """Read ``count`` events (comments are collected into ``comments`` when given)."""
    events: list[Event] = []
    lines = getattr(response, "_sse_lines", None)
    if lines is None:
        lines = response.aiter_lines()
        response._sse_lines = lines  # type: ignore[attr-defined]  # one line iterator per response
    if count == 0:
        return events

    async def go() -> None:
        kind, data, ident = "message", "", None
        async for line in lines:
            if line.startswith(":"):
                if comments is not None:
                    comments.append(line)
                continue
            if line == "":
                if data:
                    events.append(Event(kind, json.loads(data), ident))
                    if len(events) >= count:
                        return
                kind, data, ident = "message", "", None
                continue
            field, _, value = line.partition(": ")
            if field == "event":
                kind = value
            elif field == "data":
                data += value
            elif field == "id":
                ident = value

    await asyncio.wait_for(go(), timeout)
    return events


# ---- uvicorn subprocess --------------------------------------------------------------------------


@dataclass
class UvicornProcess:
    """``uvicorn squadbus.service:create_app --factory`` as a child process, restartable on the same port."""

    port: int
    env: dict[str, str]
    log: Path
    proc: Any = None

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start and wait until the port answers."""
        # run in the tmp dir so the audit log (a relative path by default) lands there
        argv = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', str(self.log.parent),
                sys.executable, "-m", "uvicorn", "squadbus.service:create_app", "--factory",
                "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        self.proc = spawn(argv, self.log, env=self.env)
        try:
            wait_until(lambda: port_open(self.port), 30, f"uvicorn (log {self.log})", self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop by PID (SIGTERM, then SIGKILL)."""
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


@pytest.fixture
def uvicorn_process(tmp_path: Path) -> Iterator[UvicornProcess]:
    """A not-yet-started uvicorn child on a SQLite file store in the tmp dir; always stopped after."""
    env = {**os.environ, "SQUADBUS_URL": "memory://",
           "SQUADBUS_STORE_URL": f"sqlite+aiosqlite:///{tmp_path / 'served.db'}"}
    env.pop("SQUADBUS_TOKENS_FILE", None)
    server = UvicornProcess(free_port(), env, tmp_path / "uvicorn.log")
    try:
        yield server
    finally:
        server.stop()
