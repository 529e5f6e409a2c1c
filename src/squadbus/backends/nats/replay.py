"""Replay of one execution from the stream, from a stream sequence or a time.

The stream is keyed by subject, not by execution, so a replay reads every
message of the stream from its start point (``opt_start_seq`` or
``opt_start_time``) up to the last sequence at the time of the call and keeps
those of the execution: cost O(messages in the stream after the start
point), one pass, with a temporary in-memory, unacknowledged (AckNone)
consumer that is deleted afterwards. Replay is for recovery and debugging;
the HistoryStore answers "give me this execution" with an index.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from uuid import UUID

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

from squadbus.backends.nats.translate import translate
from squadbus.core import subjects
from squadbus.core.backoff import NOT_READY, Backoff
from squadbus.core.envelope import Message, decode
from squadbus.core.errors import MalformedMessage

logger = logging.getLogger("squadbus.backends.nats")

_BATCH = 1000
_NOT_READY_TIMEOUT = 10.0
# Server timestamps and created_at come from different clocks; start early, filter exactly.
_CLOCK_SLACK = timedelta(seconds=5)


async def _fetch(sub: JetStreamContext.PullSubscription) -> list[Msg]:
    """The next batch, [] when nothing is left; waits out a consumer that is not ready yet
    (a new consumer in a cluster answers 503 until its group has a leader)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _NOT_READY_TIMEOUT
    backoff = Backoff(NOT_READY)
    while True:
        try:
            msgs: list[Msg] = await sub.fetch(_BATCH, timeout=2.0)
            return msgs
        except (nats.errors.TimeoutError, TimeoutError):
            return []
        except nats.js.errors.ServiceUnavailableError as exc:
            if loop.time() > deadline:
                raise translate(exc, "replay: read the stream") from exc
            await backoff.sleep()
        except nats.errors.Error as exc:
            raise translate(exc, "replay: read the stream") from exc


async def replay(
    js: JetStreamContext, stream: str, execution: UUID, *, from_seq: int = 0, since: datetime | None = None
) -> AsyncIterator[tuple[int, Message]]:
    """Yield ``(stream_seq, message)`` of ``execution`` in stream order (see the module docstring)."""
    try:
        info = await js.stream_info(stream)
    except Exception as exc:
        raise translate(exc, f"replay: stream info of {stream}") from exc
    last = info.state.last_seq
    first = max(info.state.first_seq, from_seq, 1)
    if last == 0 or first > last:
        return
    name = f"replay-{secrets.token_hex(8)}"
    config = api.ConsumerConfig(
        name=name, ack_policy=api.AckPolicy.NONE, filter_subject=subjects.ALL,
        mem_storage=True, num_replicas=1, inactive_threshold=30.0,
    )
    if since is not None and from_seq <= info.state.first_seq:
        config.deliver_policy = api.DeliverPolicy.BY_START_TIME
        config.opt_start_time = since - _CLOCK_SLACK
    else:
        config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = first
    try:
        await js.add_consumer(stream, config)
        sub = await js.pull_subscribe_bind(name, stream=stream)
    except Exception as exc:
        raise translate(exc, "replay: create a reader") from exc
    needle = str(execution).encode()
    try:
        seq = 0
        while seq < last:
            msgs = await _fetch(sub)
            if not msgs:
                break  # nothing left up to ``last`` (messages may have been trimmed)
            for msg in msgs:
                seq = msg.metadata.sequence.stream
                if seq > last:
                    break
                if needle not in msg.data:
                    continue  # cheap pre-filter before the full decode
                try:
                    message = decode(msg.data)
                except MalformedMessage:
                    continue
                if message.task_execution_id != execution:
                    continue
                if since is not None and message.created_at < since:
                    continue
                yield seq, message
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, name)
