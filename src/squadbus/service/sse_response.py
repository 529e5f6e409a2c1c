"""The response of the SSE routes: a stream that drops a client which stops reading.

A write to a client waits while the client's socket is full. A client that
stops reading would hold its stream, and the page of history it was being
sent, for as long as it keeps the connection open. :class:`SseResponse`
gives each write ``send_timeout`` seconds: a write that cannot start in
that time ends the stream and closes the connection. Nothing is lost: the
client reconnects with the ``Last-Event-ID`` of the last event it read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

logger = logging.getLogger("squadbus.service.sse")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _Stalled(Exception):
    """The client did not take a write within the send timeout."""


class SseResponse(StreamingResponse):
    """A ``text/event-stream`` response whose every write must go through within ``send_timeout`` seconds."""

    def __init__(self, content: AsyncIterator[bytes], *, send_timeout: float) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.send_timeout = send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream the content; on a stalled write, stop and let the server close the connection."""

        async def bounded(message: Message) -> None:
            try:
                await asyncio.wait_for(send(message), self.send_timeout)
            except TimeoutError:
                raise _Stalled from None

        try:
            await super().__call__(scope, receive, bounded)
        except _Stalled:
            # the server logs that the response was not completed and closes the connection
            logger.info("SSE client %s took no data for %.0f s: stream dropped (it resumes with Last-Event-ID)",
                        _peer(scope), self.send_timeout)
        finally:
            await self._close_body()

    async def _close_body(self) -> None:
        # run the stream's finally (leave the hub) now, not whenever the generator is collected
        close = getattr(self.body_iterator, "aclose", None)
        if close is not None:
            await close()


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"
