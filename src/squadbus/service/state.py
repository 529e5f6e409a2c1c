"""The per-app state the routes use (built by the lifespan, reached through the request)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from squadbus.core.bus import Bus
from squadbus.core.settings import Settings
from squadbus.service.group_commit import GroupWriter
from squadbus.service.id_claims import IdClaims
from squadbus.service.metrics import ServiceMetrics
from squadbus.service.presence import PresenceReader
from squadbus.service.sse_hub import SseHub
from squadbus.store.base import HistoryStore
from squadbus.workers.base import Worker

ALL_WORKERS = ("db-writer", "sse-broadcaster", "analytics", "audit-logger")


@dataclass(frozen=True, kw_only=True, slots=True)
class ServiceOptions:
    """How one service process runs (the deployment choices that are not in :class:`Settings`).

    ``workers``: which workers run inside this process (``squadbus serve``
    runs all four; a replica behind a load balancer with separate worker
    processes keeps at least ``sse-broadcaster``). ``max_body_bytes``
    defaults to ``2 * max_content_bytes + 64 KiB``. ``heartbeat``: seconds
    between SSE comment lines. ``sse_queue_size`` and ``sse_buffer_bytes``:
    frames and bytes buffered per viewer before it is caught up from the store
    instead. ``sse_page_bytes``: message bodies read from the store at a time
    by an SSE replay (at least one message). ``sse_send_timeout``: seconds
    an SSE client may take no data before its stream is dropped (it resumes
    with ``Last-Event-ID``). ``audit_path``: the
    audit-logger's file (None: ``audit.jsonl`` in the settings' data directory). ``poll_interval``: the
    feeds' safety-net store poll. ``db_writer_max_wait``: batching delay of
    the in-process db-writer (SSE latency of messages published directly on
    the bus). ``readiness_timeout``: seconds each ``/readyz`` check may take.
    ``metrics_message_types``: distinct message types with a ``/metrics`` label
    of their own; later ones count under ``other``. ``body_timeout``: seconds
    a request body may take to arrive (408 after).
    """

    workers: tuple[str, ...] = ALL_WORKERS
    max_body_bytes: int | None = None
    heartbeat: float = 15.0
    sse_queue_size: int = 1024
    sse_buffer_bytes: int = 4 * 1024 * 1024
    sse_page_bytes: int = 1024 * 1024
    sse_send_timeout: float = 60.0
    poll_interval: float = 5.0
    db_writer_batch_size: int = 500
    db_writer_max_wait: float = 0.01
    audit_path: str | None = None
    audit_max_bytes: int = 64 * 1024 * 1024
    audit_max_files: int | None = None
    readiness_timeout: float = 2.0
    metrics_message_types: int = 100
    body_timeout: float = 30.0

    def __post_init__(self) -> None:
        unknown = set(self.workers) - set(ALL_WORKERS)
        if unknown:
            raise ValueError(f"unknown workers {sorted(unknown)}; expected some of {', '.join(ALL_WORKERS)}")
        if self.heartbeat <= 0 or self.poll_interval <= 0 or self.sse_send_timeout <= 0 or min(
            self.sse_queue_size, self.sse_buffer_bytes, self.sse_page_bytes
        ) < 1:
            raise ValueError("heartbeat, poll_interval and sse_send_timeout must be positive, "
                             "sse_queue_size and sse_*_bytes >= 1")

    def body_limit(self, settings: Settings) -> int:
        """The request body size limit in bytes."""
        return self.max_body_bytes or 2 * settings.max_content_bytes + 64 * 1024


@dataclass(slots=True)
class Service:
    """Everything a request handler needs; one per app, alive between lifespan start and end."""

    settings: Settings
    options: ServiceOptions
    bus: Bus
    store: HistoryStore
    hub: SseHub
    metrics: ServiceMetrics
    writer: GroupWriter
    workers: list[Worker] = field(default_factory=list)
    claims: IdClaims = field(default_factory=IdClaims)
    presence: PresenceReader = field(default_factory=PresenceReader)


async def get_service(request: Request) -> Service:
    """The running Service of the app handling ``request`` (503 outside the lifespan).

    Async on purpose: FastAPI runs plain ``def`` dependencies in a thread pool.
    """
    service: Service | None = getattr(request.app.state, "service", None)
    if service is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "service is not running")
    return service


ServiceDep = Annotated[Service, Depends(get_service)]
