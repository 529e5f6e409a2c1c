"""Everything retained, once (``ReadsAll``): one temporary consumer filtered by the pattern.

The stream's last sequence is noted first (``stream_info``, the snapshot). Then one in-memory
consumer without acks (``AckPolicy.NONE``, R1, named ``read-all-<random>``) delivers from the start
of the stream (or from ``since`` less a clock slack) up to that sequence, in stream order. It is
deleted at the end, and the server drops it after 30 s idle if the process dies first.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncGenerator, Callable
from datetime import datetime, timedelta

import nats.errors
from nats.js import api
from nats.js.client import JetStreamContext

from squadbus.backends.nats.translate import translate
from squadbus.core.backend import read_back
from squadbus.core.envelope import Message
from squadbus.core.errors import BackendTimeout

_PAGE = 1000
_FETCH_WAIT = 1.0
_STALL = 15.0  # seconds without a message while short of the snapshot's end before giving up
_CLOCK_SLACK = timedelta(seconds=60)  # the server's clock decides the start, the sender's created_at


async def read_all(
    js: JetStreamContext, stream: str, pattern: str, *, since: datetime | None = None,
    on_unreadable: Callable[[bytes], None] | None = None,
) -> AsyncGenerator[Message, None]:
    """Yield every message of ``stream`` matching ``pattern``; see the module docstring."""
    try:
        state = (await js.stream_info(stream)).state
    except Exception as exc:
        raise translate(exc, f"stream info of {stream}") from exc
    last = state.last_seq
    if last == 0 or state.first_seq > last:
        return
    name = f"read-all-{secrets.token_hex(8)}"
    config = api.ConsumerConfig(
        name=name, ack_policy=api.AckPolicy.NONE, filter_subject=pattern, mem_storage=True,
        num_replicas=1, inactive_threshold=30.0, deliver_policy=api.DeliverPolicy.ALL,
    )
    if since is not None:
        config.deliver_policy = api.DeliverPolicy.BY_START_TIME
        config.opt_start_time = since - _CLOCK_SLACK
    try:
        await js.add_consumer(stream, config)
        sub = await js.pull_subscribe_bind(name, stream=stream)
        pending = (await js.consumer_info(stream, name)).num_pending
    except Exception as exc:
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, name)
        raise translate(exc, f"create a reader on {stream}") from exc
    try:
        seq, idle = 0, 0.0
        while pending and seq < last:
            try:
                msgs = await sub.fetch(_PAGE, timeout=_FETCH_WAIT)
            except (nats.errors.TimeoutError, TimeoutError):
                idle += _FETCH_WAIT
                if idle >= _STALL:
                    raise BackendTimeout(f"nats: no message after sequence {seq} of {last} "
                                         f"for {_STALL:g} s") from None
                continue
            except nats.errors.Error as exc:
                raise translate(exc, f"read {stream}") from exc
            idle = 0.0
            for msg in msgs:
                seq = msg.metadata.sequence.stream
                if seq > last:
                    return
                message = read_back(msg.data, ">", since, on_unreadable)  # the consumer filters by pattern
                if message is not None:
                    yield message
            if msgs and msgs[-1].metadata.num_pending == 0:
                return  # nothing else matches the filter (up to now)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, name)
