"""A new group's backlog: what the log holds for its pattern, copied into its queue.

A group created at ``StartFrom.EARLIEST`` needs every log message published
before its queue was bound (docs/backends/rabbitmq.md, "Start positions").
Each pass reads the log once, up to a marker appended when the pass starts,
and copies each message into every waiting queue whose pattern matches it
(default exchange, confirmed). Groups created while a pass runs wait for the
next one, so N groups created at once (inboxes opening) cost a few reads of
the log instead of N: their queues were all bound before the pass's marker,
so nothing they need is missed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import aio_pika

from squadbus.backends.rabbitmq.log import read_log
from squadbus.backends.rabbitmq.topology import ORIGINAL_KEY_HEADER
from squadbus.core import subjects
from squadbus.core.tasks import cancel_and_wait

if TYPE_CHECKING:
    from squadbus.backends.rabbitmq.backend import RabbitBackend

_COPY_CONCURRENCY = 256

Accept = Callable[[str], bool]
"""A further filter on the routing keys a pattern matches (an inbox partition takes its agents' only)."""


def _is_literal(pattern: str) -> bool:
    return not any(token in ("*", ">") for token in pattern.split("."))


class BacklogCopier:
    """Copies the log's backlog into new group queues, one read of the log per pass for all waiting."""

    def __init__(self, backend: RabbitBackend) -> None:
        self._backend = backend
        self._waiting: dict[str, tuple[str, Accept | None, asyncio.Future[int]]] = {}
        self._runner: asyncio.Task[None] | None = None
        self.passes = 0
        """Reads of the log so far (one per pass)."""

    async def copy(self, queue: str, pattern: str, accept: Accept | None = None) -> int:
        """Copy what the log holds for ``pattern`` (and ``accept``, when given) into ``queue`` (bound
        already); returns how many.

        Raises what the pass raised (a BackendError) when the log cannot be read or a copy is not confirmed.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._waiting[queue] = (pattern, accept, future)
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run(), name="squadbus-rabbitmq-backlog")
        return await future

    async def close(self) -> None:
        """Stop a pass in progress (its waiting creators get CancelledError). Idempotent."""
        runner = self._runner
        if runner is not None and not runner.done():
            await cancel_and_wait(runner)

    async def _run(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, {}
            try:
                counts = await self._pass({queue: (pattern, accept) for queue, (pattern, accept, _) in batch.items()})
            except BaseException as exc:
                for _, _, future in batch.values():
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
                if not isinstance(exc, Exception):
                    raise
                continue
            for queue, (_, _, future) in batch.items():
                if not future.done():
                    future.set_result(counts[queue])

    async def _pass(self, targets: dict[str, tuple[str, Accept | None]]) -> dict[str, int]:
        self.passes += 1
        literal: dict[str, list[str]] = {}
        wildcard: list[tuple[str, str, Accept | None]] = []
        for queue, (pattern, accept) in targets.items():
            if _is_literal(pattern) and accept is None:
                literal.setdefault(pattern, []).append(queue)
            else:
                wildcard.append((queue, pattern, accept))
        counts = dict.fromkeys(targets, 0)
        publisher = self._backend.publisher
        pending: list[asyncio.Future[None]] = []
        try:
            async for _, msg in read_log(self._backend):
                key = msg.routing_key or ""
                queues = [*literal.get(key, ()), *(q for q, pattern, accept in wildcard
                                                   if subjects.matches(pattern, key) and (not accept or accept(key)))]
                for queue in queues:
                    copy = aio_pika.Message(
                        msg.body, message_id=msg.message_id, content_type=msg.content_type,
                        delivery_mode=publisher.delivery_mode, headers={ORIGINAL_KEY_HEADER: key},
                    )
                    pending.append(asyncio.ensure_future(
                        publisher.publish_to_queue(queue, copy, f"copy the log into {queue}")))
                    counts[queue] += 1
                if len(pending) >= _COPY_CONCURRENCY:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.gather(*pending)
        finally:
            for future in pending:
                future.cancel()
        return counts
