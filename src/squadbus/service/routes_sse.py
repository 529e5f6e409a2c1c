"""``GET /v1/executions/{id}/events``: the live SSE stream of one execution.

The stream starts with a ``snapshot`` event (the execution's message count,
seq range and agents; no id), then ``message`` events whose ``id`` is the
store's per-execution ``seq``. A client reconnecting with ``Last-Event-ID``
(or ``?after=<seq>``) gets exactly the rows after that seq, read from the
store, so nothing is lost or repeated across reconnects, service restarts and
replicas sharing a store. Rows removed by retention since that seq become one
``gap`` event (``{"from_seq", "to_seq", "reason"}``, id = ``to_seq``). Comment
lines (``: keepalive``) are sent every ``heartbeat`` seconds. Closing the
stream cancels nothing but the stream. When the server stops, the stream ends
(cleanly, after the events it holds) and the client resumes with
``Last-Event-ID``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import StreamingResponse

from squadbus.service.auth import Principal, reader
from squadbus.service.errors import LocatedInvalid
from squadbus.service.routes_messages import ERRORS
from squadbus.service.schemas import SnapshotOut
from squadbus.service.sse_hub import ViewerStream, event_frame
from squadbus.service.sse_response import SseResponse
from squadbus.service.state import ServiceDep

router = APIRouter(prefix="/v1", tags=["executions"])

RETRY_MS = 2000

SSE_EVENT_SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["snapshot", "message", "gap"]},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "description": "snapshot: SnapshotOut; message: MessageOut; gap: {from_seq, to_seq, reason}"},
        "id": {"type": "string", "description": "the seq (message) or the last skipped seq (gap)"},
        "retry": {"type": "integer"},
    },
    "required": ["event", "data"],
}


MAX_EVENT_ID = 2**62
"""The largest resume cursor (``Last-Event-ID`` or ``?after=``): far above any seq or position, inside int64."""


def resume_cursor(last_event_id: str | None, after: int | None) -> int:
    """Where a stream resumes: ``Last-Event-ID`` (wins) or ``?after=``, else 0.

    The header must be ASCII digits up to :data:`MAX_EVENT_ID`, else 422 before
    anything is streamed (a larger value would overflow the store's int64).
    """
    if last_event_id is not None and last_event_id.strip():
        text = last_event_id.strip()
        if not (text.isascii() and text.isdigit()) or int(text) > MAX_EVENT_ID:
            raise LocatedInvalid(f"Last-Event-ID must be an event id: ASCII digits, at most {MAX_EVENT_ID}",
                                 ("header", "Last-Event-ID"))
        return int(text)
    return after or 0


@router.get(
    "/executions/{execution_id}/events",
    response_class=StreamingResponse,
    responses={
        **ERRORS,
        200: {"description": "snapshot, then message and gap events (data is JSON); comment lines are heartbeats",
              "content": {"text/event-stream": {"itemSchema": SSE_EVENT_SCHEMA}}},
    },
    summary="Live events of an execution (SSE)",
)
async def execution_events(
    execution_id: UUID,
    service: ServiceDep,
    who: Annotated[Principal, Depends(reader)],
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=40)] = None,
    after: Annotated[int | None, Query(ge=0, le=2**62, description="Resume after this seq (header wins)")] = None,
) -> StreamingResponse:
    """Stream the execution's messages from the cursor on (0: from the start), then live."""
    cursor = resume_cursor(last_event_id, after)
    snapshot = await service.store.snapshot(execution_id)
    hub, heartbeat = service.hub, service.options.heartbeat

    async def frames() -> AsyncIterator[bytes]:
        # joined inside the generator so that leaving is guaranteed by its finally
        viewer = await hub.join(execution_id)
        try:
            data = SnapshotOut.of(snapshot).model_dump(mode="json")
            yield b"retry: %d\n" % RETRY_MS + event_frame("snapshot", data)
            async for chunk in ViewerStream(hub, viewer, after=cursor, heartbeat=heartbeat).frames():
                yield chunk
        finally:
            hub.leave(viewer)

    return SseResponse(frames(), send_timeout=service.options.sse_send_timeout)
