"""Auto-batching publisher: concurrent publishes share one round trip.

Each ``publish`` call encodes its message and queues it; one flusher task
sends everything queued so far as a single Lua call (dedupe + two XADDs per
message), so N concurrent publishers cost about one round trip, not N. A
publish returns only when Redis answered for its message (and, in the durable
profile on Redis >= 7.2, after ``WAITAOF``), retries through connection loss
with backoff, and raises :class:`~squadbus.core.errors.ConnectionLost` or
:class:`~squadbus.core.errors.BackendTimeout` once its ``publish_timeout``
has passed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from squadbus.backends.redis._driver import RETRYABLE, aioredis, redis_errors
from squadbus.backends.redis.layout import KeyLayout, is_reply
from squadbus.backends.redis.settings import RedisSettings
from squadbus.core.envelope import Message, encode
from squadbus.core.errors import BackendError, BackendTimeout, Closed, ConnectionLost, PublishFailed

logger = logging.getLogger("squadbus.backends.redis.publisher")

# KEYS[1] = subject-stream registry; then per message: dedupe key, partition stream, subject stream.
# ARGV[1] = dedupe ttl ms (0 = off), ARGV[2] = reply stream ttl ms; then per message:
# subject, execution id, payload, is-reply flag. Returns the partition entry id per
# message, or false for a duplicate id (already stored: the publish still succeeded).
PUBLISH_LUA = """
local ttl = tonumber(ARGV[1])
local reply_ttl = tonumber(ARGV[2])
local out = {}
local n = (#KEYS - 1) / 3
for i = 1, n do
  local k = 1 + 3 * (i - 1)
  local a = 2 + 4 * (i - 1)
  local fresh = true
  if ttl > 0 then
    fresh = redis.call('SET', KEYS[k + 1], '1', 'NX', 'PX', ttl)
  end
  if fresh then
    out[i] = redis.call('XADD', KEYS[k + 2], '*', 's', ARGV[a + 1], 'x', ARGV[a + 2], 'm', ARGV[a + 3])
    redis.call('XADD', KEYS[k + 3], '*', 's', ARGV[a + 1], 'x', ARGV[a + 2], 'm', ARGV[a + 3])
    if ARGV[a + 4] == '1' then
      redis.call('PEXPIRE', KEYS[k + 3], reply_ttl)
    else
      redis.call('SADD', KEYS[1], KEYS[k + 3])
    end
  else
    out[i] = false
  end
end
return out
"""


@dataclass(slots=True)
class _Pending:
    message: Message
    payload: bytes
    future: asyncio.Future[bool]
    deadline: float
    errors: list[BaseException] = field(default_factory=list)


class RedisPublisher:
    """Batches concurrent publishes into one Lua call per round trip."""

    def __init__(self, client: aioredis.Redis, layout: KeyLayout, settings: RedisSettings) -> None:
        self._client = client
        self._layout = layout
        self._settings = settings
        self._script = client.register_script(PUBLISH_LUA)
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self.wait_aof = False
        self.published = 0
        self.duplicates = 0
        self.batches = 0
        self.retries = 0

    async def publish(self, message: Message) -> bool:
        """Store ``message``; True if new, False if its id was seen within the dedupe window."""
        if self._closed:
            raise Closed("redis backend is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._pending.append(_Pending(message, encode(message), future, loop.time() + self._settings.publish_timeout))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush_loop(), name="squadbus-redis-publisher")
        return await future

    async def close(self) -> None:
        """Refuse new publishes and wait for the ones in flight (each bounded by its timeout)."""
        self._closed = True
        flusher = self._flusher
        if flusher is not None:
            await asyncio.gather(flusher, return_exceptions=True)

    async def _flush_loop(self) -> None:
        try:
            while self._pending:
                limit = self._settings.publish_batch
                batch, self._pending = self._pending[:limit], self._pending[limit:]
                await self._send(batch)
        finally:
            self._flusher = None

    async def _send(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.05
        last: BaseException | None = None
        while True:
            now = loop.time()
            live: list[_Pending] = []
            for item in batch:
                if item.future.done():
                    continue
                if now >= item.deadline:
                    item.future.set_exception(self._timeout_error(last))
                else:
                    live.append(item)
            if not live:
                return
            batch = live
            budget = min(item.deadline for item in live) - now
            try:
                async with asyncio.timeout(budget):
                    results = await self._execute(live)
            except TimeoutError as exc:  # our budget ran out (OSError subclass: catch it first)
                last = exc
                continue
            except RETRYABLE as exc:
                last = exc
                self.retries += 1
                logger.warning("publish of %d message(s) failed, retrying: %s", len(live), exc)
                await asyncio.sleep(min(backoff, max(0.0, budget)))
                backoff = min(backoff * 2, 1.0)
                continue
            except BackendError as exc:
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(exc)
                return
            except redis_errors.RedisError as exc:
                error = PublishFailed(f"Redis refused the publish: {exc}")
                error.__cause__ = exc
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(error)
                return
            self.batches += 1
            for item, entry_id in zip(live, results, strict=True):
                fresh = entry_id is not None
                if fresh:
                    self.published += 1
                else:
                    self.duplicates += 1
                if not item.future.done():
                    item.future.set_result(fresh)
            return

    def _timeout_error(self, last: BaseException | None) -> BackendError:
        seconds = self._settings.publish_timeout
        error: BackendError
        if last is None or isinstance(last, TimeoutError | redis_errors.TimeoutError):
            error = BackendTimeout(f"Redis did not confirm the publish within {seconds}s")
        else:
            error = ConnectionLost(f"Redis was not reachable within the publish timeout of {seconds}s: {last}")
        error.__cause__ = last
        return error

    async def _execute(self, batch: list[_Pending]) -> list[Any]:
        layout = self._layout
        settings = self._settings
        keys: list[str] = [layout.registry]
        args: list[Any] = [int(settings.dedupe_window * 1000), int(settings.reply_ttl * 1000)]
        for item in batch:
            message = item.message
            subject = message.subject
            keys.append(layout.dedupe_key(message))
            keys.append(layout.partition_stream(layout.partition_index(message)))
            keys.append(layout.subject_stream(subject))
            execution = message.task_execution_id
            args.append(subject)
            args.append("" if execution is None else str(execution))
            args.append(item.payload)
            args.append(b"1" if is_reply(subject) else b"0")
        if not self.wait_aof:
            results: list[Any] = await self._script(keys=keys, args=args)
            return results
        timeout_ms = max(1, int(settings.publish_timeout * 1000))
        async with self._client.pipeline(transaction=False) as pipe:
            await self._script(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAITAOF", 1, 0, timeout_ms)
            results, synced = await pipe.execute()
        if not synced or int(synced[0]) < 1:
            raise PublishFailed(f"Redis did not fsync the batch to its AOF within {settings.publish_timeout}s")
        return list(results)
