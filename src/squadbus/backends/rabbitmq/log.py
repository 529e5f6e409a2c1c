"""Reading the log stream from an offset up to "now" (replay, read_all, a new group's backlog).

A stream queue is read over AMQP 0-9-1 by a consumer with ``x-stream-offset``
(``first``, a number, or a timestamp) and manual acks (which only give
credit: nothing is removed). A stream never ends, so the reader first appends
a marker message to it and stops when it reads that marker back: everything
stored before the marker was read, nothing published after it is waited for.
Other readers' markers are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import TYPE_CHECKING

import aio_pika.abc

from squadbus.backends.rabbitmq.topology import MARKER_HEADER
from squadbus.backends.rabbitmq.translate import translate
from squadbus.core.errors import BackendTimeout

if TYPE_CHECKING:
    from squadbus.backends.rabbitmq.backend import RabbitBackend

logger = logging.getLogger("squadbus.backends.rabbitmq")

_PREFETCH = 1000
_ACK_EVERY = 200

Offset = str | int | datetime
"""Where to start: ``"first"``, a stream offset, or a time (second precision on the broker)."""


async def read_log(
    backend: RabbitBackend, start: Offset = "first", *, queue_name: str | None = None
) -> AsyncIterator[tuple[int, aio_pika.abc.AbstractIncomingMessage]]:
    """Yield ``(offset, message)`` from ``start`` up to a marker appended now; markers are not yielded.

    Reads the log stream, or the stream ``queue_name`` (the group registry).

    Raises BackendTimeout when the stream stops delivering before the marker
    (for ``connect_timeout`` + ``publish_timeout`` seconds) and another
    BackendError when the broker refuses.
    """
    stream = queue_name or backend.settings.log_queue
    settings = backend.settings
    marker = await backend.publisher.marker(stream)
    what = f"read the stream {stream}"
    try:
        channel = await backend.connection.channel()
        await channel.set_qos(prefetch_count=_PREFETCH)
        queue = await channel.get_queue(stream, ensure=False)
    except Exception as exc:
        raise translate(exc, what) from exc
    inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        inbox.put_nowait(message)

    quiet = settings.connect_timeout + settings.publish_timeout
    unacked = 0
    try:
        try:
            await queue.consume(on_message, arguments={"x-stream-offset": start})
        except Exception as exc:
            raise translate(exc, what) from exc
        while True:
            try:
                message = await asyncio.wait_for(inbox.get(), quiet)
            except TimeoutError as exc:
                raise BackendTimeout(f"{what}: no message for {quiet:g} s before the end marker") from exc
            unacked += 1
            if unacked >= _ACK_EVERY:
                unacked = 0
                await message.ack(multiple=True)
            if message.message_id == marker:
                return
            headers = message.headers or {}
            if MARKER_HEADER in headers:
                continue
            offset = headers.get("x-stream-offset")
            yield (int(offset) if isinstance(offset, int) else -1), message
    finally:
        with contextlib.suppress(Exception):  # closing the channel ends the consumer either way
            await channel.close()
