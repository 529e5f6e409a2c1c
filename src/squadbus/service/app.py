"""The app factory: ``uvicorn squadbus.service:create_app --factory``.

:func:`create_app` builds a FastAPI app whose lifespan creates (or adopts)
the Bus and the HistoryStore, the SSE hub and the in-process workers, and
closes what it created, in reverse order, on shutdown. There are no module
globals: everything lives on ``app.state`` of the app that owns it, so any
number of apps can run in one process (tests do).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Annotated
from uuid import uuid4

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Response, status
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

from squadbus import __version__
from squadbus.core.bus import Bus
from squadbus.core.errors import ConfigError, SquadbusError
from squadbus.core.settings import Settings
from squadbus.service import (
    dashboard,
    errors,
    openapi,
    routes_dead_letters,
    routes_events,
    routes_executions,
    routes_messages,
    routes_sse,
)
from squadbus.service.auth import Principal, Role, TokenTable, load_tokens, reader
from squadbus.service.group_commit import GroupWriter
from squadbus.service.limits import BodyLimit
from squadbus.service.metrics import ServiceMetrics
from squadbus.service.open_mode import LoopbackOnly
from squadbus.service.schemas import ErrorOut, Health
from squadbus.service.sse_hub import SseHub
from squadbus.service.state import Service, ServiceDep, ServiceOptions
from squadbus.store.base import HistoryStore, StoredMessage, open_store
from squadbus.workers.analytics import Analytics
from squadbus.workers.audit import AuditLogger
from squadbus.workers.base import Worker
from squadbus.workers.db_writer import DbWriter
from squadbus.workers.dead_letters import DeadLetterKeeper
from squadbus.workers.sse_broadcaster import SseBroadcaster

logger = logging.getLogger("squadbus.service")

DOCS_ASSETS = "/static/docs"
"""Where the API docs' Swagger UI and ReDoc assets are served (from the package, not a CDN)."""

ops = APIRouter(tags=["operations"])


SERVICE_HEADER = "X-Squadbus-Version"
"""Sent with ``/healthz``: how the CLI tells a squadbus service from anything else on a port."""


@ops.get("/healthz", summary="Liveness")
async def healthz(response: Response) -> Health:
    """The process is up (says nothing about the bus or the store); the header names the squadbus version."""
    response.headers[SERVICE_HEADER] = __version__
    return Health(status="ok")


PROBE_POSITION = 2**62
"""Where the readiness replay starts: past every real position, so the backend answers "nothing" in one round trip."""


async def _bus_round_trip(bus: Bus) -> str:
    """``ok`` once the backend has answered a replay of an unknown execution from :data:`PROBE_POSITION`.

    The Backend protocol has no ping; this replay is the cheapest request every
    Replayable backend serves (memory: a scan of its window; Redis: one XRANGE;
    NATS: one stream info; Kafka: a short-lived consumer reading two offsets).
    """
    try:
        async for _ in bus.replay(uuid4(), from_seq=PROBE_POSITION):
            break
    except ConfigError:
        return "ok (started; this backend offers no round trip to probe)"
    return "ok"


async def _check(probe: Awaitable[str | None], timeout: float) -> str:
    try:
        result = await asyncio.wait_for(probe, timeout)
    except TimeoutError:
        return f"unavailable: timed out after {timeout:g} s"
    except (SquadbusError, OSError) as exc:
        return f"unavailable: {exc or type(exc).__name__}"
    return result or "ok"


@ops.get("/readyz", summary="Readiness", responses={503: {"model": Health, "description": "Not ready"}})
async def readyz(service: ServiceDep) -> JSONResponse:
    """Ready when the store answers a ping and the bus backend answers a request, each within the timeout.

    ``checks`` names each part (``store``, ``bus``) and why it is not ready.
    """
    timeout = service.options.readiness_timeout
    store, bus = await asyncio.gather(_check(service.store.ping(), timeout),
                                      _check(_bus_round_trip(service.bus), timeout))
    checks = {"store": store, "bus": bus}
    ready = all(v.startswith("ok") for v in checks.values())
    body = Health(status="ready" if ready else "not ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=status.HTTP_200_OK if ready else 503)


@ops.get(
    "/metrics", summary="Prometheus metrics", response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
               401: {"model": ErrorOut}, 403: {"model": ErrorOut}},
)
async def metrics(service: ServiceDep, who: Annotated[Principal, Depends(reader)]) -> Response:
    """Prometheus text exposition of this process's metrics (viewer and admin tokens; agents get 403)."""
    if who.role is Role.AGENT:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "agent tokens cannot read metrics (viewer or admin only)")
    body, content_type = await service.metrics.scrape()
    return Response(body, media_type=content_type)


def _workers(service: Service, analytics_out: list[Analytics]) -> list[Worker]:
    opts, bus, store, hub, metrics_ = service.options, service.bus, service.store, service.hub, service.metrics
    built: list[Worker] = []
    for name in opts.workers:
        if name == "db-writer":

            async def on_written(rows: list[StoredMessage]) -> None:
                metrics_.record_stored(rows, "db-writer")
                hub.offer(rows)

            built.append(DbWriter(bus, store, batch_size=opts.db_writer_batch_size,
                                  max_wait=opts.db_writer_max_wait, on_written=on_written,
                                  on_dead_letters=metrics_.record_dead_letters))
            built.append(DeadLetterKeeper(bus, store))  # the db-writer leaves dead letters out of the history
        elif name == "sse-broadcaster":
            broadcaster = SseBroadcaster(bus, hub.notify)
            metrics_.sources.latencies[name] = broadcaster.latency
            built.append(broadcaster)
        elif name == "analytics":
            analytics = Analytics(bus)
            analytics_out.append(analytics)
            metrics_.sources.latencies[name] = analytics.latency
            built.append(analytics)
        elif name == "audit-logger":
            audit = AuditLogger(bus, path=opts.audit_path or service.settings.audit_path,
                                max_bytes=opts.audit_max_bytes, max_files=opts.audit_max_files)
            metrics_.sources.latencies[name] = audit.latency
            built.append(audit)
    return built


def create_app(
    settings: Settings | None = None,
    *,
    bus: Bus | None = None,
    store: HistoryStore | None = None,
    options: ServiceOptions | None = None,
    tokens: TokenTable | None = None,
) -> FastAPI:
    """Build the HTTP service.

    ``settings`` defaults to ``Settings.from_env()``. A ``bus`` or ``store``
    passed in is started/opened if needed but not closed by the app (the
    caller owns it); otherwise the lifespan builds them from ``settings`` and
    closes them. ``tokens`` overrides ``settings.tokens_file``; an empty
    table (no tokens file) means open mode: the app then answers only
    loopback peers addressing a loopback host (see :mod:`.open_mode`).
    """
    settings = settings or Settings.from_env()
    options = options or ServiceOptions()
    table = tokens if tokens is not None else load_tokens(settings.tokens_file)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            the_bus = bus or Bus.from_settings(settings)
            await the_bus.start()
            if bus is None:
                stack.push_async_callback(the_bus.close)
            if store is None and settings.default_store:
                await asyncio.to_thread(Path(settings.data_dir).mkdir, parents=True, exist_ok=True)
            the_store = store or open_store(settings.store_url)
            await the_store.open()
            if store is None:
                stack.push_async_callback(the_store.close)
            hub = SseHub(the_store, queue_size=options.sse_queue_size, poll_interval=options.poll_interval,
                         buffer_bytes=options.sse_buffer_bytes, page_bytes=options.sse_page_bytes)
            await hub.start()
            stack.push_async_callback(hub.close)
            service_metrics = ServiceMetrics(the_bus.backend.name, max_types=options.metrics_message_types)
            service = Service(settings=settings, options=options, bus=the_bus, store=the_store, hub=hub,
                              metrics=service_metrics, writer=GroupWriter(the_store))
            service_metrics.sources.bus = the_bus
            service_metrics.sources.hub = hub
            analytics: list[Analytics] = []
            for worker in _workers(service, analytics):
                await worker.start()
                stack.push_async_callback(worker.stop)
                service.workers.append(worker)
            service_metrics.sources.analytics = analytics[0] if analytics else None
            app.state.service = service
            logger.info(
                "squadbus service ready: backend %s, store %s, workers %s, %s",
                the_bus.backend.name, type(the_store).__name__, ", ".join(options.workers) or "none",
                "OPEN (no tokens)" if table.open else "bearer tokens required",
            )
            try:
                yield
            finally:
                app.state.service = None

    # FastAPIOffline: /docs (Swagger UI 5) and /redoc load their JS and CSS from the package
    # (fastapi-offline ships them), not from a CDN, so they work on a machine without internet.
    app = FastAPIOffline(
        static_url=DOCS_ASSETS,
        title="squadbus",
        version=__version__,
        description="Messages between AI agents: send, query history, watch executions live (SSE).",
        lifespan=lifespan,
    )
    app.state.tokens = table
    app.state.service = None
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=options.body_limit(settings), body_timeout=options.body_timeout)
    if table.open:
        app.add_middleware(LoopbackOnly)  # added last: the outermost check
    app.include_router(routes_messages.router)
    app.include_router(routes_executions.router)
    app.include_router(routes_sse.router)
    app.include_router(routes_events.router)
    app.include_router(routes_dead_letters.router)
    app.include_router(ops)
    app.include_router(dashboard.router)
    if settings.a2a and importlib.util.find_spec("a2a") is not None:  # squadbus[a2a]: the A2A edge, docs/a2a.md
        from squadbus.service.a2a.routes import install as install_a2a

        install_a2a(app)
    openapi.describe(app)
    return app
