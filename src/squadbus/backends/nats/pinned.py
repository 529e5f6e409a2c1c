"""Order across a take-over in an ordered group (``pinned_client``): hold, then release in stream order.

When the server pins a member (the first message carrying a new
``Nats-Pin-Id``), the messages the previous pinned member held unacknowledged
come to it as redeliveries, before newer messages but in no particular
order (nats-server 2.15.1 redelivered ten pending messages as 4 5 6 2 7 0 8
3 9 1). So a newly pinned member holds what it receives, asks the consumer
for ``num_ack_pending`` and its delivered stream sequence, and once every
message pending at that moment has arrived (or ``2 * ack_wait`` passed: some
may have been acked late by a member that was only paused), hands them to
the dispatcher sorted by stream sequence. While it holds them it sends
``+WPI`` for each every ``ack_wait / 3``, so the server does not redeliver
them meanwhile (which made every held message a duplicate).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

logger = logging.getLogger("squadbus.backends.nats")


class TakeoverBuffer:
    """The messages of one member between its pinning and the end of the previous member's backlog."""

    def __init__(self, nc: Client, info_subject: str, timeout: float, release: Callable[[list[Msg]], None],
                 seq_of: Callable[[Msg], int]) -> None:
        self._nc = nc
        self._info_subject = info_subject
        self._timeout = timeout
        self._release = release
        self._seq_of = seq_of
        self._held: dict[int, Msg] = {}  # by stream sequence: a redelivered copy replaces the first
        self._upto: int | None = None
        self._expect = 0
        self._arrived = 0
        self._task: asyncio.Task[None] | None = None
        self.holding = False

    def start(self) -> None:
        """This member was just pinned: hold what comes until the backlog it takes over is complete."""
        if self.holding:
            return
        self.holding = True
        self._upto = None
        self._arrived = 0
        self._task = asyncio.get_running_loop().create_task(self._plan(), name="squadbus-nats-takeover")

    def add(self, msg: Msg) -> None:
        seq = self._seq_of(msg)
        again = seq in self._held
        self._held[seq] = msg
        if not again and self._upto is not None and seq <= self._upto:
            self._arrived += 1
        self._check()

    async def _plan(self) -> None:
        try:
            reply = await self._nc.request(self._info_subject, b"", timeout=self._timeout)
            info = json.loads(reply.data)
            self._expect = int(info.get("num_ack_pending", 0))
            self._upto = upto = int(info.get("delivered", {}).get("stream_seq", 0))
            self._arrived = sum(1 for seq in self._held if seq <= upto)
        except (nats.errors.Error, TimeoutError, ValueError) as exc:
            logger.warning("could not read the consumer's pending count after being pinned (%s); "
                           "holding for ack_wait", exc)
        self._check()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * self._timeout
        while self.holding and loop.time() < deadline:
            await asyncio.sleep(self._timeout / 3)
            if self.holding:
                await self._touch()
        if self.holding:
            logger.info("taking over: %d pending messages expected, %d came within 2 * ack_wait; going on",
                        self._expect, self._arrived)
            self._finish()

    async def _touch(self) -> None:
        for msg in list(self._held.values()):
            try:
                await self._nc.publish(msg.reply, b"+WPI")
            except nats.errors.Error as exc:
                logger.debug("could not extend ack_wait of a held message: %s", exc)
                return

    def _check(self) -> None:
        if self.holding and self._upto is not None and self._arrived >= self._expect:
            self._finish()

    def _finish(self) -> None:
        self.holding = False
        held, self._held = self._held, {}
        if held:
            self._release([held[seq] for seq in sorted(held)])

    def drain(self) -> list[Msg]:
        """Closing: what is held (to be given back)."""
        if self._task is not None:
            self._task.cancel()
        self.holding = False
        held, self._held = self._held, {}
        return list(held.values())
