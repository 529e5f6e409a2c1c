"""Retention: trim streams to ``maxlen`` / ``max_age``, reporting every unacknowledged entry trimmed.

Publishing never trims (``XADD`` without ``MAXLEN``), because Redis trims
silently. Instead, every ``trim_interval`` seconds one process (the holder of
a short lock key) computes, per stream, the first entry id to keep, counts
for every consumer group the entries below it that the group has not
acknowledged (still pending, or not read yet and matching the group's
pattern), logs them and adds them to the ``trimmed_unacked`` counter (in
``RedisBackend.stats()`` and the shared ``<prefix>:stats`` hash), and only
then runs ``XTRIM MINID``. At most ``_SCAN_LIMIT`` entries are trimmed per
stream per pass, so a pass stays short; the next pass continues.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

from squadbus.backends.redis._driver import FAILURES, aioredis, call, redis_errors
from squadbus.backends.redis.consumer import RedisCounters
from squadbus.backends.redis.layout import KeyLayout
from squadbus.backends.redis.settings import RedisSettings
from squadbus.core import subjects

logger = logging.getLogger("squadbus.backends.redis.retention")

_SCAN_LIMIT = 10_000


def _next_id(entry_id: bytes) -> str:
    ms, _, seq = entry_id.decode().partition("-")
    return f"{ms}-{int(seq) + 1}"


def _id_key(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class Trimmer:
    """Runs the retention passes of one backend instance (see the module docstring)."""

    def __init__(
        self, client: aioredis.Redis, layout: KeyLayout, settings: RedisSettings, counters: RedisCounters
    ) -> None:
        self._client = client
        self._layout = layout
        self._settings = settings
        self._counters = counters
        self._token = secrets.token_hex(8)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="squadbus-redis-trimmer")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _loop(self) -> None:
        interval = self._settings.trim_interval
        while True:
            await asyncio.sleep(interval)
            try:
                locked = await call(self._client,
                    "SET", self._layout.trim_lock, self._token, "NX", "PX", int(interval * 2000)
                )
                if locked:
                    await self.trim_all()
                    await call(self._client, "DEL", self._layout.trim_lock)
            except FAILURES as exc:
                logger.warning("retention pass failed, will retry: %s", exc)

    async def trim_all(self) -> int:
        """One pass over every stream; returns how many entries were trimmed."""
        settings = self._settings
        trimmed = 0
        if settings.maxlen is not None or settings.max_age is not None:
            for stream in self._layout.partition_streams():
                trimmed += await self.trim_stream(stream, settings.maxlen)
        if settings.subject_maxlen is not None or settings.max_age is not None:
            cursor: int | bytes = 0
            while True:
                cursor, members = await call(self._client,
                    "SSCAN", self._layout.registry, cursor, "COUNT", 500
                )
                for member in members:
                    trimmed += await self.trim_stream(member.decode(), settings.subject_maxlen)
                if int(cursor) == 0:
                    break
        return trimmed

    async def _first_kept(self, stream: str, maxlen: int | None) -> tuple[str | None, list[Any]]:
        """The first entry id to keep and the entries (up to the scan limit) before it."""
        client = self._client
        cut: str | None = None
        if self._settings.max_age is not None:
            cut = f"{int((time.time() - self._settings.max_age) * 1000)}-0"
        if maxlen is not None:
            length = int(await call(client, "XLEN", stream))
            excess = length - maxlen
            if excess > 0:
                head = await call(client, "XRANGE", stream, "-", "+", "COUNT", min(excess, _SCAN_LIMIT))
                by_length = _next_id(head[-1][0])
                if cut is None or _id_key(by_length) > _id_key(cut):
                    cut = by_length
        if cut is None:
            return None, []
        doomed = await call(client, "XRANGE", stream, "-", f"({cut}", "COUNT", _SCAN_LIMIT)
        if not doomed:
            return None, []
        if len(doomed) == _SCAN_LIMIT:
            cut = _next_id(doomed[-1][0])
        return cut, doomed

    async def trim_stream(self, stream: str, maxlen: int | None) -> int:
        """Trim one stream; report unacknowledged entries first. Returns how many were trimmed."""
        cut, doomed = await self._first_kept(stream, maxlen)
        if cut is None:
            return 0
        client = self._client
        try:
            groups = await call(client, "XINFO", "GROUPS", stream)
        except redis_errors.ResponseError:
            groups = []
        patterns: dict[bytes, bytes] = {}
        if groups:
            names = [g[b"name"] for g in groups]
            values = await call(client, "HMGET", self._layout.groups, *names)
            patterns = {n: v for n, v in zip(names, values, strict=True) if v is not None}
        for info in groups:
            name: bytes = info[b"name"]
            pending = await call(client,
                "XPENDING", stream, name, "-", f"({cut}", _SCAN_LIMIT, parse_detail=True
            )
            last = _id_key(info[b"last-delivered-id"])
            pattern = patterns.get(name)
            # A subject stream's entries carry no subject (the stream is the subject): all count.
            unread = [
                entry_id for entry_id, fields in doomed
                if _id_key(entry_id) > last and (
                    pattern is None or (subject := (fields or {}).get(b"s")) is None
                    or subjects.matches(pattern.decode(), subject.decode())
                )
            ]
            lost = len(pending) + len(unread)
            if lost:
                self._counters.trimmed_unacked += lost
                await call(client, "HINCRBY", self._layout.stats, "trimmed_unacked", lost)
                logger.warning(
                    "retention trimmed %d entries of %s that group %s had not acknowledged (%d pending, %d unread)",
                    lost, stream, name.decode(), len(pending), len(unread),
                )
        removed = int(await call(client, "XTRIM", stream, "MINID", cut))
        self._counters.trimmed += removed
        if removed:
            await call(client, "HINCRBY", self._layout.stats, "trimmed", removed)
        return removed
