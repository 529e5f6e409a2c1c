"""Publishing: JetStream for ``agent.>`` (waits for the PubAck), core NATS for everything else.

Many publishes are in flight at once: each goes out with ``publish_async``
(bounded by ``max_pending_acks`` per connection) and its caller waits for its
own PubAck, so concurrent callers share the connection's pipelining instead
of paying a round trip each. Every message carries ``Nats-Msg-Id`` = its id,
so the stream drops a repeat within ``dedupe_window``; that makes the retry
below safe: a publish that failed for a transient reason (no stream leader
during an election, a timeout while reconnecting) is sent again until
``publish_timeout`` runs out, then the translated error is raised.

After the PubAck of an agent's direct message the publisher rings the agent's bell (core NATS,
empty; :mod:`.inboxes`): the host holding that agent's inbox reads it. A bell lost on the way is
caught by the inbox sweep.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.js.client import JetStreamContext

from squadbus.backends.nats.inboxes import bell_of
from squadbus.backends.nats.settings import NatsSettings
from squadbus.backends.nats.translate import is_transient, is_unanswered, translate
from squadbus.core import subjects
from squadbus.core.backoff import WRITE_RETRY, Backoff
from squadbus.core.envelope import Message, encode
from squadbus.core.errors import BackendTimeout

logger = logging.getLogger("squadbus.backends.nats")

_STREAM_PREFIX = subjects.ROOT + "."
_SWEEP_INTERVAL = 0.05


def _nothing() -> None:
    pass


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
        # (deadline, future) of PubAcks waited for with the full ack_timeout: deadlines are
        # increasing, so one sweeper checks the head instead of one timer per publish.
        self._deadlines: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._sweeper: asyncio.Task[None] | None = None

    def _watch(
        self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], timeout: float
    ) -> Callable[[], None]:
        """Fail ``future`` with a timeout after ``timeout`` seconds; returns a function that stops watching."""
        if timeout < self._settings.ack_timeout:
            timer = loop.call_later(timeout, _expire, future)
            return timer.cancel
        self._deadlines.append((loop.time() + timeout, future))
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = loop.create_task(self._sweep(), name="squadbus-nats-puback-timeouts")
        return _nothing

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        deadlines = self._deadlines
        while deadlines:
            now = loop.time()
            while deadlines and (deadlines[0][1].done() or deadlines[0][0] <= now):
                _expire(deadlines.popleft()[1])
            await asyncio.sleep(_SWEEP_INTERVAL)

    def close(self) -> None:
        """Fail every PubAck still awaited (the connection is going away)."""
        while self._deadlines:
            _expire(self._deadlines.popleft()[1])
        if self._sweeper is not None:
            self._sweeper.cancel()

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
        backoff = Backoff(WRITE_RETRY)
        # True once an attempt went out and got no answer (PubAck timeout, connection lost while waiting):
        # the stream may hold the message, whatever later attempts say.
        maybe_stored = False
        while True:
            remaining = deadline - loop.time()
            sent = False
            try:
                # nats-py wraps a stall timeout in a task and a timer: only pay for it when the
                # pending-ack window is actually full.
                full = self._js.publish_async_pending() >= settings.max_pending_acks
                future = await self._js.publish_async(
                    subject, data, wait_stall=max(remaining, 0.001) if full else None,
                    headers={"Nats-Msg-Id": msg_id},
                )
                # Failing the future on timeout (not cancelling it) also releases nats-py's
                # pending-ack slot; cheaper than asyncio.wait_for on this hot path.
                sent = True
                unwatch = self._watch(loop, future, min(max(remaining, 0.001), settings.ack_timeout))
                try:
                    ack = await future
                finally:
                    unwatch()
            except Exception as exc:
                maybe_stored = maybe_stored or (sent and is_unanswered(exc))
                remaining = deadline - loop.time()
                pause = backoff.next()
                if not is_transient(exc) or remaining <= pause:
                    error = translate(exc, f"publish to {subject}")
                    if maybe_stored and not isinstance(error, BackendTimeout):
                        # "Not stored" would be a lie: an earlier attempt may have been (seen in a cluster
                        # whose stream leader was killed: 4 sends told PublishFailed were delivered).
                        error = BackendTimeout(f"publish to {subject}: no PubAck for an earlier attempt, so it "
                                               f"may be stored; retry with the same id (last attempt: {error})")
                    raise error from exc
                self.retries += 1
                logger.debug("publish of %s failed (%s: %s); retrying", msg_id, type(exc).__name__, exc)
                await asyncio.sleep(pause)
                continue
            if ack.duplicate:
                self.duplicates += 1
            bell = bell_of(self._settings.stream, subject)
            if bell is not None:
                try:
                    await self._nc.publish(bell, b"")
                except nats.errors.Error as exc:  # the inbox sweep reads it anyway
                    logger.debug("bell %s not rung: %s", bell, exc)
            return
