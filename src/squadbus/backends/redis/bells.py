"""The Pub/Sub connection on which a backend hears its open agents' bells (see ``inboxes.py``).

The publish script rings ``<prefix>:bell:<agent>`` (an empty ``PUBLISH``) with every direct
message. :class:`Bells` holds one Pub/Sub connection subscribed to the bells of the agents open
here and calls ``on_ring(agent_id)`` per bell. A bell is fire-and-forget: while the connection is
down they are lost, so when it is back (every open agent's bell subscribed again) ``on_reconnect()``
is called for the caller to look at every agent once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from squadbus.backends.redis._driver import aioredis
from squadbus.core.backoff import RECONNECT, Backoff

logger = logging.getLogger("squadbus.backends.redis.bells")

_PER_COMMAND = 1000
"""Channels per SUBSCRIBE / UNSUBSCRIBE."""


class Bells:
    """One Pub/Sub connection for many agents' bells, reconnected (with backoff) when it breaks."""

    def __init__(
        self, client: aioredis.Redis, *, prefix: str, confirm_timeout: float,
        on_ring: Callable[[str], None], on_reconnect: Callable[[], None],
        channels: Callable[[], Sequence[bytes]],
    ) -> None:
        self._client = client
        self._head = len(prefix)
        self._confirm_timeout = confirm_timeout
        self._on_ring = on_ring
        self._on_reconnect = on_reconnect
        self._channels = channels  # every open agent's bell, to subscribe again after a reconnect
        self._pubsub: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._failing = False
        self._closed = False

    @property
    def connected(self) -> bool:
        """True while the Pub/Sub connection is up (not between a failure and its reconnect)."""
        return self._pubsub is not None

    async def subscribe(self, channels: Sequence[bytes]) -> None:
        """Subscribe ``channels`` and wait (at most ``confirm_timeout``) until Redis confirms them, so a
        read that follows comes after the bell is heard; unconfirmed, the caller's sweep covers them."""
        if self._pubsub is None:
            if self._listener is not None:
                return  # reconnecting: it subscribes every open agent's bell
            self._pubsub = self._client.pubsub()
        loop = asyncio.get_running_loop()
        waiting = []
        for channel in channels:
            future = self._confirm.get(channel)
            if future is None:
                future = self._confirm[channel] = loop.create_future()
            waiting.append(future)
        for first in range(0, len(channels), _PER_COMMAND):
            await self._pubsub.subscribe(*channels[first:first + _PER_COMMAND])
        if self._listener is None:
            self._listener = loop.create_task(self._listen(), name="squadbus-inbox-bells")
        _, late = await asyncio.wait(waiting, timeout=self._confirm_timeout)
        if late:
            logger.warning("inboxes: %d bell subscriptions not confirmed in time; the sweep covers them", len(late))

    async def unsubscribe(self, channels: Sequence[bytes]) -> None:
        """Stop hearing ``channels`` (a broken connection is rebuilt without them anyway)."""
        pubsub = self._pubsub
        if pubsub is None or not channels:
            return
        for first in range(0, len(channels), _PER_COMMAND):
            await pubsub.unsubscribe(*channels[first:first + _PER_COMMAND])

    async def close(self) -> None:
        """Stop listening and close the connection. Idempotent."""
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        await self._drop()

    async def _listen(self) -> None:
        backoff = Backoff(RECONNECT)
        while not self._closed:
            pubsub = self._pubsub
            try:
                if pubsub is None:
                    await self._resubscribe()
                    backoff.reset()
                    continue
                message = await pubsub.get_message(timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a Redis error, or redis-py's own complaint about a dead connection
                if not self._failing:
                    logger.warning("inboxes: bell connection failed (%r); reconnecting, then reading every agent",
                                   exc)
                self._failing = True
                await self._drop()
                await backoff.sleep()
                continue
            if message is None:
                continue
            kind = message.get("type")
            channel = message.get("channel")
            if kind == "message":
                self._on_ring(channel[self._head:].decode(errors="replace"))
            elif kind == "subscribe":
                future = self._confirm.pop(channel, None)
                if future is not None and not future.done():
                    future.set_result(None)

    async def _drop(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        for future in self._confirm.values():
            if not future.done():
                future.set_result(None)  # not confirmed: the look at every agent after reconnecting covers them
        self._confirm.clear()
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def _resubscribe(self) -> None:
        pubsub: Any = self._client.pubsub()
        try:
            channels = list(self._channels())
            for first in range(0, len(channels), _PER_COMMAND):
                await pubsub.subscribe(*channels[first:first + _PER_COMMAND])
        except BaseException:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            raise
        self._pubsub = pubsub
        if self._failing:
            self._failing = False
            logger.info("inboxes: bell connection back; reading every open agent once")
        self._on_reconnect()
