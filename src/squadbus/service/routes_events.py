"""``GET /v1/events``: every stored message whose subject matches a pattern, live (SSE).

The squad-wide counterpart of ``/v1/executions/{id}/events``, for ``squadbus
tail`` and monitors: messages of every execution and messages without one.

Event ids are the store's **global position** (``StoredMessage.position``, the
key of the history cursor), not the per-execution ``seq``: one stream crosses
executions, so only a squad-wide order can say where it stopped. The stream is
fed from the store in that order, so a reconnect with ``Last-Event-ID: N`` (or
``?after=N``) gets exactly the matching rows stored after N, across restarts
and replicas sharing the store. How exact "after N" is depends on the engine:

* SQLite writes one transaction at a time, so positions are in commit order
  and resuming is exact;
* PostgreSQL takes a position when a row is inserted, and two writers'
  transactions may commit in the other order: a row that becomes visible after
  a higher position was streamed is in history (``GET /v1/messages``) but not
  on this stream. Per-execution streams have no such window (their seq is
  taken under a per-execution lock).

Without a cursor, ``start=earliest`` (default) streams the whole retained
history first, ``start=new`` only messages created from the moment the stream
opened. A cursor older than everything retained gets one ``gap`` event first.
The first event, ``start`` (no id), says where the stream begins. When the
server stops, the stream ends after the rows it has read (resume with
``Last-Event-ID``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import StreamingResponse

from squadbus.core import subjects
from squadbus.core.envelope import utcnow
from squadbus.core.errors import InvalidSubject
from squadbus.service.auth import Principal, overseer
from squadbus.service.errors import LocatedInvalid
from squadbus.service.routes_messages import ERRORS
from squadbus.service.routes_sse import RETRY_MS, resume_cursor
from squadbus.service.sse_hub import CHUNK_BYTES, HEARTBEAT_FRAME, STORE_PAGE, event_frame, message_payload
from squadbus.service.sse_response import SseResponse
from squadbus.service.state import Service, ServiceDep
from squadbus.store import HistoryQuery, position_cursor

router = APIRouter(prefix="/v1", tags=["events"])

_SCOPES = frozenset({subjects.ROOT, "*", ">"})

EVENTS_SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["start", "message", "gap"]},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "description": "start: {pattern, after, since}; message: MessageOut; "
                                "gap: {from_position, to_position, reason}"},
        "id": {"type": "string", "description": "the store's global position of the message (or the last one "
                                                "a gap skipped); resume with Last-Event-ID"},
        "retry": {"type": "integer"},
    },
    "required": ["event", "data"],
}


def check_pattern(pattern: str) -> str:
    """``pattern`` if it is a valid pattern that can match a squad subject (under ``agent.``), else 422."""
    try:
        subjects.validate_pattern(pattern)
    except InvalidSubject as exc:
        raise LocatedInvalid(str(exc), ("query", "pattern")) from exc
    if pattern.split(".", 1)[0] not in _SCOPES:
        raise LocatedInvalid(f"pattern {pattern!r} matches nothing: every squad subject is under agent.",
                             ("query", "pattern"))
    return pattern


async def _gap_before(service: Service, after: int) -> bytes | None:
    """A ``gap`` frame when retention removed rows after position ``after``, else None."""
    oldest = (await service.store.query(HistoryQuery(limit=1))).items
    first = oldest[0].position if oldest else None
    if first is None or first <= after + 1:
        return None
    data = {"from_position": after + 1, "to_position": first - 1, "reason": "retention"}
    return event_frame("gap", data, event_id=first - 1)


@router.get(
    "/events",
    response_class=StreamingResponse,
    responses={
        **ERRORS,
        200: {"description": "start, then message (and gap) events (data is JSON); comment lines are heartbeats",
              "content": {"text/event-stream": {"itemSchema": EVENTS_SCHEMA}}},
    },
    summary="Live messages of the whole squad matching a subject pattern (SSE)",
    description=__doc__,
)
async def squad_events(
    service: ServiceDep,
    who: Annotated[Principal, Depends(overseer)],
    pattern: Annotated[str, Query(min_length=1, max_length=subjects.MAX_SUBJECT_LENGTH,
                                  description="NATS-style pattern: '*' one token, '>' the rest")] = subjects.ALL,
    start: Annotated[Literal["earliest", "new"], Query(description="Where to begin without a cursor")] = "earliest",
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=40)] = None,
    after: Annotated[int | None, Query(ge=0, le=2**62, description="Resume after this position (header wins)")] = None,
) -> StreamingResponse:
    """Stream matching messages from the cursor (or ``start``) on, then live."""
    check_pattern(pattern)
    resuming = (last_event_id is not None and bool(last_event_id.strip())) or after is not None
    cursor = resume_cursor(last_event_id, after)
    since: datetime | None = utcnow() if start == "new" and not resuming else None
    hub, heartbeat = service.hub, service.options.heartbeat

    async def frames() -> AsyncIterator[bytes]:
        # registered before the first read, so nothing committed after that read goes unnoticed
        watcher = hub.watch()
        try:
            head = {"pattern": pattern, "after": cursor if resuming else None, "since": since}
            yield b"retry: %d\n" % RETRY_MS + event_frame("start", head)
            last = cursor
            if resuming and (gap := await _gap_before(service, cursor)) is not None:
                yield gap
            while True:
                # a page is bounded in bytes and sent as it is read: a watcher that stops reading holds one
                page = await service.store.query(HistoryQuery(
                    cursor=position_cursor(last), since=since, limit=STORE_PAGE, max_bytes=hub.page_bytes,
                ))
                out: list[bytes] = []
                size = 0
                for row in page.items:
                    last = max(last, row.position or 0)
                    if subjects.matches(pattern, row.message.subject):
                        out.append(event_frame("message", message_payload(row), event_id=row.position))
                        size += len(out[-1])
                        if size >= CHUNK_BYTES:
                            yield b"".join(out)
                            out, size = [], 0
                if out:
                    yield b"".join(out)
                if hub.closing:
                    return  # the server is stopping: the client resumes after what was sent
                if page.next_cursor is not None:
                    del page  # not held through the next read
                    continue
                if not await watcher.wait(heartbeat) and not hub.closing:
                    yield HEARTBEAT_FRAME
        finally:
            hub.unwatch(watcher)

    return SseResponse(frames(), send_timeout=service.options.sse_send_timeout)
