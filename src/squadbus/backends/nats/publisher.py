"""Publishing: JetStream for ``agent.>`` (waits for the PubAck), core NATS for everything else.

Many publishes are in flight at once: each goes out with ``publish_async``
(bounded by ``max_pending_acks`` per connection) and its caller waits for its
own PubAck, so concurrent callers share the connection's pipelining instead
of paying a round trip each. Every message carries ``Nats-Msg-Id`` = its id,
so the stream drops a repeat within ``dedupe_window``; that makes the retry
below safe: a publish that failed for a transient reason (no stream leader
during an election, a timeout while reconnecting) is sent again until
``publish_timeout`` runs out, then the translated error is raised.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.js.client import JetStreamContext

from squadbus.backends.nats.settings import NatsSettings
from squadbus.backends.nats.translate import is_transient, translate
from squadbus.core import subjects
from squadbus.core.envelope import Message, encode

logger = logging.getLogger("squadbus.backends.nats")

_STREAM_PREFIX = subjects.ROOT + "."


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(nats.errors.TimeoutError())


class NatsPublisher:
    """Publishes envelopes; see the module docstring."""

    def __init__(self, nc: Client, js: JetStreamContext, settings: NatsSettings) -> None:
        self._nc = nc
        self._js = js
        self._settings = settings
        self.retries = 0
        self.duplicates = 0

    async def publish(self, message: Message) -> None:
        """Store ``message`` (PubAck received) or raise a BackendError subclass."""
        data = encode(message)
        subject = message.subject
        if not subject.startswith(_STREAM_PREFIX):
            # Reply inboxes and other subjects outside the stream: core NATS, at most once.
            try:
                await self._nc.publish(subject, data)
            except nats.errors.Error as exc:
                raise translate(exc, f"publish to {subject}") from exc
            return
        await self._publish_stream(subject, data, str(message.id))

    async def _publish_stream(self, subject: str, data: bytes, msg_id: str) -> None:
        loop = asyncio.get_running_loop()
        settings = self._settings
        deadline = loop.time() + settings.publish_timeout
        pause = 0.05
        while True:
            remaining = deadline - loop.time()
            try:
                future = await self._js.publish_async(
                    subject, data, wait_stall=max(remaining, 0.001), headers={"Nats-Msg-Id": msg_id}
                )
                # A timer failing the future is cheaper than asyncio.wait_for on this hot path;
                # failing it (not cancelling) also releases nats-py's pending-ack slot.
                timer = loop.call_later(min(max(remaining, 0.001), settings.ack_timeout), _expire, future)
                try:
                    ack = await future
                finally:
                    timer.cancel()
            except Exception as exc:
                remaining = deadline - loop.time()
                if not is_transient(exc) or remaining <= pause:
                    raise translate(exc, f"publish to {subject}") from exc
                self.retries += 1
                logger.debug("publish of %s failed (%s: %s); retrying", msg_id, type(exc).__name__, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)
                continue
            if ack.duplicate:
                self.duplicates += 1
            return
