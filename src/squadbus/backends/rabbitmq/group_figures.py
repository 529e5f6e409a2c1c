"""Consumer-group figures of the RabbitMQ backend (``DescribesGroups``) from passive queue declares.

AMQP 0-9-1 cannot list queues (only the management plugin's HTTP API can, and
it is not assumed), so the backend records each group it creates in a stream
queue of its own, ``<namespace>.groups`` (one JSON record: queue, group,
pattern; no retention): every process's groups are found there, plus this
process's own members (groups created before the registry existed are seen
only by a process with a member). What a passive ``queue.declare`` answers is
all the broker tells over AMQP:

* ``lag``: the queue's *ready* messages (``message_count`` of a quorum queue
  is the ready count: not yet handed to any consumer).
* ``pending``, ``redeliveries``: ``None``. Unacknowledged messages and
  delivery counts are kept by the broker (the management API's
  ``messages_unacknowledged``) but AMQP does not report them.
* ``dead_letters``: ``None``. Dead letters go to ``agent.dlq.<group>`` on
  the exchange: the log stream holds them among everything else, and counting
  them would be a read of the whole log per scrape.

A registered queue that is gone (deleted by hand) is left out. Cost: one read
of the registry stream (a marker publish with its confirm, then O(groups
ever created) records) and one passive declare per group, one at a time on
the backend's probe connection.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import aio_pika

from squadbus.backends.rabbitmq.log import read_log
from squadbus.backends.rabbitmq.translate import translate
from squadbus.core.backend import GroupFigures

if TYPE_CHECKING:
    from squadbus.backends.rabbitmq.backend import RabbitBackend

logger = logging.getLogger("squadbus.backends.rabbitmq")


def registry_record(queue: str, group: str, pattern: str) -> aio_pika.Message:
    """The registry stream's record of a group created with ``queue``."""
    body = json.dumps({"queue": queue, "group": group, "pattern": pattern}).encode()
    return aio_pika.Message(body, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


async def registered_groups(backend: RabbitBackend) -> dict[str, tuple[str, str]]:
    """Queue name -> ``(group, pattern)`` of every group recorded in the registry stream."""
    found: dict[str, tuple[str, str]] = {}
    async for _, msg in read_log(backend, queue_name=backend.settings.registry_queue):
        try:
            record = json.loads(msg.body)
            found[str(record["queue"])] = (str(record["group"]), str(record["pattern"]))
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("skipping an unreadable record of the group registry %s: %s",
                           backend.settings.registry_queue, exc)
    return found


async def group_figures(backend: RabbitBackend) -> list[GroupFigures]:
    """One :class:`GroupFigures` per group queue that exists (see the module docstring)."""
    try:
        groups = await registered_groups(backend)
    except Exception as exc:
        raise translate(exc, "read the group registry") from exc
    for queue, group, pattern in backend.local_groups():
        groups[queue] = (group, pattern)
    counts = await backend.ready_counts(sorted(groups))
    out = []
    for queue, ready in counts.items():
        if ready is None:
            continue
        group, pattern = groups[queue]
        out.append(GroupFigures(group=group, subject=pattern, lag=ready, pending=None))
    return out
