"""Where messages live in Redis: the subject -> stream mapping (docs/backends/redis.md).

Every message is written, in one Lua call, to two streams:

* its **partition stream** ``<prefix>:p:<n>``, ``n`` = a hash of its
  ``task_execution_id`` (or of its subject when it has none) modulo
  ``partitions``. One execution's messages are all in one stream, in publish
  order; wildcard subscriptions read every partition stream and filter by
  subject on the client.
* its **subject stream** ``<prefix>:s:<subject>``. A literal subscription
  (no wildcard: an agent's direct inbox, a broadcast, a domain, a DLQ)
  reads only this stream, so 10,000 agent inboxes do not each read the
  whole squad's traffic.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from squadbus.core import subjects
from squadbus.core.envelope import Message

_SEQ_BITS = 22
_SEQ_MASK = (1 << _SEQ_BITS) - 1


def position_of(entry_id: bytes | str) -> int:
    """An integer position for a stream entry id ``<ms>-<seq>`` (order preserved)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return (int(ms) << _SEQ_BITS) | min(int(seq or 0), _SEQ_MASK)


def entry_id_of(position: int) -> str:
    """The stream entry id a position stands for (inverse of :func:`position_of`)."""
    return f"{position >> _SEQ_BITS}-{position & _SEQ_MASK}"


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """Key names and the partition function for one ``prefix`` and partition count."""

    prefix: str
    partitions: int

    @property
    def registry(self) -> str:
        """A set of every subject stream key, for the trimmer."""
        return f"{self.prefix}:subjects"

    @property
    def stats(self) -> str:
        """A hash of counters shared by every process (e.g. ``trimmed_unacked``)."""
        return f"{self.prefix}:stats"

    @property
    def groups(self) -> str:
        """A hash of Redis group name -> subscription pattern, for the trimmer's per-group filter."""
        return f"{self.prefix}:groups"

    @property
    def trim_lock(self) -> str:
        """Held by the one process trimming at a time."""
        return f"{self.prefix}:trim-lock"

    def partition_stream(self, index: int) -> str:
        return f"{self.prefix}:p:{index}"

    def partition_streams(self) -> list[str]:
        return [self.partition_stream(i) for i in range(self.partitions)]

    def partition_index(self, message: Message) -> int:
        """Which partition ``message`` goes to: by execution, else by subject."""
        if message.task_execution_id is not None:
            return message.task_execution_id.int % self.partitions
        return zlib.crc32(message.subject.encode()) % self.partitions

    def bell(self, agent_id: str) -> str:
        """The Pub/Sub channel the publish script rings (no payload) when it stores a direct message
        to ``agent_id``: the hosts of open inboxes listen on it (``backends/redis/inboxes.py``)."""
        return f"{self.prefix}:bell:{agent_id}"

    def lease(self, agent_id: str) -> str:
        """Held (``SET NX PX``) by the one backend instance serving ``agent_id``'s inbox (``inboxes.py``)."""
        return f"{self.prefix}:lease:{agent_id}"

    def subject_stream(self, subject: str) -> str:
        return f"{self.prefix}:s:{subject}"

    def streams_for(self, pattern: str) -> list[str]:
        """The streams a subscription on ``pattern`` reads."""
        if subjects.is_literal(pattern):
            return [self.subject_stream(pattern)]
        return self.partition_streams()


_DIRECT_HEAD = subjects.MESSAGE_PREFIX + "."


def direct_recipient(subject: str) -> str | None:
    """The agent a direct subject (``agent.message.<agent>``) is for; None for any other subject."""
    if not subject.startswith(_DIRECT_HEAD):
        return None
    rest = subject[len(_DIRECT_HEAD):]
    if "." in rest or subject == subjects.BROADCAST:
        return None
    return rest


def is_reply(subject: str) -> bool:
    """Reply subjects get short-lived subject streams (they expire, not trimmed)."""
    return subject.startswith(subjects.REPLY_PREFIX + ".")
