"""Native request/reply: the request goes through JetStream, the reply comes back on core NATS.

One wildcard subscription per connection (``_INBOX.<nuid>.*``) serves every
request; each request gets its own token under it, written into the
request's ``reply_to`` header. The responder's ``Bus.reply`` publishes the
answer to that subject, which is outside ``agent.>``, so it travels on core
NATS: no stream write, no consumer. A reply that arrives after the timeout
finds no waiter and is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from squadbus.backends.nats.translate import translate
from squadbus.core.bus import REPLY_TO
from squadbus.core.envelope import Message, decode
from squadbus.core.errors import BackendError, MalformedMessage, RequestTimeout

logger = logging.getLogger("squadbus.backends.nats")

Publish = Callable[[Message], Awaitable[None]]


class ReplyRouter:
    """Routes replies arriving on this connection's reply inbox to the waiting requests."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = ""
        self._sub: Subscription | None = None
        self._waiting: dict[str, asyncio.Future[Message]] = {}
        self._lock = asyncio.Lock()

    async def _ensure(self) -> None:
        if self._sub is not None:
            return
        async with self._lock:
            if self._sub is None:
                self._prefix = self._nc.new_inbox()
                try:
                    self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_reply)
                except nats.errors.Error as exc:
                    raise translate(exc, "subscribe to the reply inbox") from exc

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject[len(self._prefix) + 1:]
        fut = self._waiting.pop(token, None)
        if fut is None or fut.done():
            return
        try:
            fut.set_result(decode(msg.data))
        except MalformedMessage as exc:
            logger.error("malformed reply on %s: %s", msg.subject, exc)
            fut.set_exception(exc)

    async def request(self, message: Message, timeout: float, publish: Publish) -> Message:
        """Publish ``message`` with a ``reply_to`` inbox and return the first reply within ``timeout``."""
        await self._ensure()
        token = secrets.token_hex(8)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[token] = fut
        try:
            async with asyncio.timeout(timeout):
                await publish(message.with_headers(**{REPLY_TO: f"{self._prefix}.{token}"}))
                return await fut
        except TimeoutError as exc:
            if isinstance(exc, BackendError):
                raise  # the publish itself timed out: a broker problem, not a silent responder
            raise RequestTimeout(f"no reply to {message.subject} within {timeout}s") from exc
        finally:
            self._waiting.pop(token, None)

    async def close(self) -> None:
        """Stop listening; pending requests time out. Idempotent."""
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except nats.errors.Error as exc:
                logger.debug("reply inbox unsubscribe failed: %s", exc)
