"""One blocking ``XREAD`` per backend for every stream read without a group.

Subscriptions without a group (squad and domain broadcasts in a Bus's
broadcast hub, ``tail``) and requests waiting for their reply each held a
pooled connection blocked in its own ``XREAD`` (issue 15: a host of the
simulated squad had 14–34 connections, the bound is 8 per Bus). The watcher
reads all of them with one ``XREAD BLOCK`` over every watched stream, on one
connection, and hands each watch the entries after its own position.

A watch added (or given room again) while that read is blocked would wait
for the read's timeout, so the watcher also reads a private *wake stream*
``<prefix>:wake:<token>`` and adds an entry to it: the blocked read returns
at once, and a read that reaches Redis after the wake-up returns at once too
(the entry is after the position it reads the wake stream from), so there is
no window in which a change is missed. A watcher with nothing to watch holds
no connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from squadbus.backends.redis._driver import FAILURES, RawEntry, aioredis, call, read_streams
from squadbus.backends.redis.consumer import RedisCounters
from squadbus.backends.redis.layout import position_of
from squadbus.backends.redis.settings import RedisSettings
from squadbus.core.backoff import RECONNECT, Backoff

logger = logging.getLogger("squadbus.backends.redis.watcher")

OnEntries = Callable[[str, list[RawEntry]], None]

_DEFAULT_COUNT = 100
_MAX_COUNT = 512
_WAKE_TTL_MS = 3_600_000


class Watch:
    """One reader of one stream: gets the entries after ``after``, while ``room()`` says it has room."""

    __slots__ = ("after", "on_entries", "paused", "room", "stream", "wait_room")

    def __init__(
        self, stream: str, after: bytes | str, on_entries: OnEntries,
        room: Callable[[], int] | None, wait_room: Callable[[], Awaitable[int]] | None,
    ) -> None:
        self.stream = stream
        self.after = after
        self.on_entries = on_entries
        self.room = room
        self.wait_room = wait_room
        self.paused = False


class StreamWatcher:
    """The one ``XREAD BLOCK`` loop of a Redis backend (module docstring)."""

    def __init__(
        self, client: aioredis.Redis, prefix: str, settings: RedisSettings, counters: RedisCounters, *,
        commands: aioredis.Redis | None = None,
    ) -> None:
        self._client = client
        self._commands = commands or client  # for wake-ups: the read holds a connection of `client`
        self._settings = settings
        self._counters = counters
        self.wake_key = f"{prefix}:wake:{secrets.token_hex(8)}"
        self._wake_after: bytes | str = "0-0"
        self._watches: dict[str, list[Watch]] = {}
        self._reading = False
        self._woken = False
        self._something = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._helpers: set[asyncio.Task[None]] = set()
        self._failing = False
        self._closed = False

    @property
    def streams(self) -> int:
        """How many streams are watched now."""
        return len(self._watches)

    def watch(
        self, stream: str, after: bytes | str, on_entries: OnEntries, *,
        room: Callable[[], int] | None = None, wait_room: Callable[[], Awaitable[int]] | None = None,
    ) -> Watch:
        """Hand ``on_entries(stream, entries)`` every entry of ``stream`` after ``after``, in order.

        ``room()`` says how many entries the watch takes now (0: none until
        ``wait_room()`` returns); without it the watch always takes some.
        """
        if self._closed:
            raise RuntimeError("the stream watcher is closed")
        w = Watch(stream, after, on_entries, room, wait_room)
        self._watches.setdefault(stream, []).append(w)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="squadbus-redis-watcher")
        self._changed()
        return w

    def unwatch(self, w: Watch) -> None:
        """Stop handing entries to ``w`` (idempotent); the read in flight may still include its stream."""
        watches = self._watches.get(w.stream)
        if watches is None or w not in watches:
            return
        watches.remove(w)
        if not watches:
            del self._watches[w.stream]

    async def close(self) -> None:
        """Stop reading and delete the wake stream. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._watches.clear()
        tasks = [t for t in (self._task, *self._helpers) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(*FAILURES):
            async with asyncio.timeout(self._settings.connect_timeout):
                await call(self._commands, "DEL", self.wake_key)

    # ---- the loop ----------------------------------------------------------------------------

    def _changed(self) -> None:
        """Something to read changed: wake the read in flight (once per read), or the idle loop."""
        self._something.set()
        if self._reading and not self._woken:
            self._woken = True
            self._spawn(self._wake())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._helpers.add(task)
        task.add_done_callback(self._helpers.discard)

    async def _wake(self) -> None:
        try:
            async with asyncio.timeout(self._settings.connect_timeout):
                async with self._commands.pipeline(transaction=False) as pipe:
                    pipe.execute_command("XADD", self.wake_key, "MAXLEN", "1", "*", "w", "1")
                    pipe.execute_command("PEXPIRE", self.wake_key, _WAKE_TTL_MS)
                    await pipe.execute()
        except FAILURES as exc:
            # The read in flight ends within `block` seconds anyway and reads the new watch then.
            logger.debug("waking the stream watcher failed: %r", exc)

    async def _resume_when_room(self, w: Watch) -> None:
        assert w.wait_room is not None
        await w.wait_room()
        w.paused = False
        self._changed()

    def _plan(self) -> tuple[dict[str, bytes | str], int]:
        """The streams to read now with the position to read each from, and the count."""
        plan: dict[str, bytes | str] = {}
        count = 0
        for stream, watches in self._watches.items():
            start: bytes | str | None = None
            for w in watches:
                if w.paused:
                    continue
                room = _DEFAULT_COUNT if w.room is None else w.room()
                if room <= 0:
                    if w.wait_room is not None:
                        w.paused = True
                        self._spawn(self._resume_when_room(w))
                        continue
                    room = 1
                count = max(count, room)
                if start is None or position_of(w.after) < position_of(start):
                    start = w.after
            if start is not None:
                plan[stream] = start
        return plan, min(count, _MAX_COUNT)

    async def _run(self) -> None:
        settings = self._settings
        block_ms = max(1, int(settings.block * 1000))
        backoff = Backoff(RECONNECT)
        while not self._closed:
            self._something.clear()
            plan, count = self._plan()
            if not plan:
                await self._something.wait()
                continue
            keys = [*plan, self.wake_key]
            positions = [*plan.values(), self._wake_after]
            self._reading, self._woken = True, False
            try:
                async with asyncio.timeout(settings.block + settings.connect_timeout + 5):
                    reply = await read_streams(self._client,
                        "XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS", *keys, *positions)
            except FAILURES as exc:
                self._counters.read_errors += 1
                if not self._failing:
                    self._failing = True
                    logger.warning("reading %d streams without a group failed, retrying: %r", len(plan), exc)
                await backoff.sleep()
                continue
            finally:
                self._reading = False
            self._failing = False
            backoff.reset()
            for stream, entries in reply:
                if stream == self.wake_key:
                    self._wake_after = entries[-1][0]
                    continue
                self._hand_out(stream, entries, position_of(plan[stream]))

    def _hand_out(self, stream: str, entries: list[RawEntry], read_from: int) -> None:
        for w in list(self._watches.get(stream, ())):
            after = position_of(w.after)
            if w.paused or after < read_from:
                # Paused, or added during the read with an earlier position: the entries between
                # its position and the read's are not in this reply; the next read includes them.
                continue
            fresh = position_of(entries[0][0]) > after  # the common case: all of them
            mine = entries if fresh else [e for e in entries if position_of(e[0]) > after]
            if not mine:
                continue
            w.after = mine[-1][0]
            try:
                w.on_entries(stream, mine)
            except Exception:
                logger.exception("a reader of %s failed on %d entries", stream, len(mine))
