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

# ARGV[1] = key prefix, ARGV[2] = dedupe ttl ms (0 = off), ARGV[3] = reply stream ttl ms; then two
# arguments per message: "<partition> <id> <execution or empty> <subject> <flag>" and the payload.
# flag 0: plain, 1: reply subject (its stream expires), 2: plain and add the subject stream to the
# registry. Subjects, ids and partitions never contain spaces. Key names are built here rather than
# passed as KEYS to halve the arguments per message (Redis Cluster is not supported anyway: one
# call touches several streams). Returns the partition entry id per message, or false for a
# duplicate id (already stored: that publish still succeeded).
PUBLISH_LUA = """
local prefix = ARGV[1]
local ttl = tonumber(ARGV[2])
local reply_ttl = tonumber(ARGV[3])
local out = {}
local n = 0
for i = 4, #ARGV, 2 do
  n = n + 1
  local p, id, x, s, flag = string.match(ARGV[i], '^(%d+) (%S+) (%S*) (%S+) (%d)$')
  local fresh = true
  if ttl > 0 then
    fresh = redis.call('SET', prefix .. ':id:' .. id, '1', 'NX', 'PX', ttl)
  end
  if fresh then
    local payload = ARGV[i + 1]
    local sstream = prefix .. ':s:' .. s
    out[n] = redis.call('XADD', prefix .. ':p:' .. p, '*', 's', s, 'x', x, 'm', payload)
    redis.call('XADD', sstream, '*', 's', s, 'x', x, 'm', payload)
    if flag == '1' then
      redis.call('PEXPIRE', sstream, reply_ttl)
    elseif flag == '2' then
      redis.call('SADD', prefix .. ':subjects', sstream)
    end
  else
    out[n] = false
  end
end
return out
"""

_MAX_FLUSHERS = 3
_REGISTERED_LIMIT = 100_000


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
        self._flushers: set[asyncio.Task[None]] = set()
        # Subject streams this process already added to the registry (SADD once, not per message).
        self._registered: set[str] = set()
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
        if not self._flushers:
            self._start_flusher()
        return await future

    async def publish_many(self, messages: list[Message]) -> None:
        """Store every message, in order, sharing the flusher's batches; raise the first failure."""
        if self._closed:
            raise Closed("redis backend is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.publish_timeout
        items = [_Pending(m, encode(m), loop.create_future(), deadline) for m in messages]
        self._pending.extend(items)
        if not self._flushers:
            self._start_flusher()
        outcomes = await asyncio.gather(*(item.future for item in items), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    def _start_flusher(self) -> None:
        task = asyncio.get_running_loop().create_task(self._flush_loop(), name="squadbus-redis-publisher")
        self._flushers.add(task)

    async def close(self) -> None:
        """Refuse new publishes and wait for the ones in flight (each bounded by its timeout)."""
        self._closed = True
        if self._flushers:
            await asyncio.gather(*self._flushers, return_exceptions=True)

    async def _flush_loop(self) -> None:
        me = asyncio.current_task()
        try:
            while self._pending:
                limit = self._settings.publish_batch
                batch, self._pending = self._pending[:limit], self._pending[limit:]
                if self._pending and len(self._flushers) < _MAX_FLUSHERS:
                    # More batches in flight: packing the next overlaps Redis running this one.
                    self._start_flusher()
                try:
                    await self._send(batch)
                except Exception as exc:  # a bug, not a Redis error: fail these publishes, keep going
                    logger.exception("publish batch failed unexpectedly")
                    for item in batch:
                        if not item.future.done():
                            error = PublishFailed(f"publish failed unexpectedly: {exc!r}")
                            error.__cause__ = exc
                            item.future.set_exception(error)
        finally:
            # Synchronously, not in a done-callback: a publish arriving right after
            # the loop ends must see no flusher and start one.
            if me is not None:
                self._flushers.discard(me)

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
        registered = self._registered
        partitions = layout.partitions
        args: list[Any] = [layout.prefix, int(settings.dedupe_window * 1000), int(settings.reply_ttl * 1000)]
        for item in batch:
            message = item.message
            subject = message.subject
            execution = message.task_execution_id
            partition = execution.int % partitions if execution is not None else layout.partition_index(message)
            if is_reply(subject):
                flag = 1
            elif subject in registered:
                flag = 0
            else:
                flag = 2
            args.append(f"{partition} {message.id} {'' if execution is None else execution} {subject} {flag}")
            args.append(item.payload)
        if not self.wait_aof:
            results: list[Any] = await self._script(keys=[], args=args)
        else:
            timeout_ms = max(1, int(settings.publish_timeout * 1000))
            async with self._client.pipeline(transaction=False) as pipe:
                await self._script(keys=[], args=args, client=pipe)
                pipe.execute_command("WAITAOF", 1, 0, timeout_ms)
                results, synced = await pipe.execute()
            if not synced or int(synced[0]) < 1:
                raise PublishFailed(f"Redis did not fsync the batch to its AOF within {settings.publish_timeout}s")
        if len(registered) > _REGISTERED_LIMIT:
            registered.clear()
        for item in batch:
            if not is_reply(item.message.subject):
                registered.add(item.message.subject)
        return list(results)
