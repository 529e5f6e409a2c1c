"""Names and shapes on the broker: routing keys, binding keys, queue names and arguments.

A subject is the routing key of its message on the squad's topic exchange. A
pattern becomes a binding key: NATS ``*`` is AMQP ``*`` (one word) and ``>``
is ``#`` at the end; ``>`` means *one or more* tokens and ``#`` zero or more,
which differ only for the subject that is the pattern's prefix itself
(``agent.message`` for ``agent.message.>``), and such subjects have too few
tokens to exist in the squadbus scheme. A literal token ``#`` (a legal agent
id) would be a wildcard in a binding, so it is bound as ``*`` and consumers
drop what their pattern does not match (:func:`squadbus.core.subjects.matches`).
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

from squadbus.core import subjects
from squadbus.core.errors import InvalidSubject

MAX_SHORTSTR = 255
"""AMQP 0-9-1 routing keys, binding keys and queue names are short strings: at most 255 bytes."""

MARKER_HEADER = "x-squadbus-marker"
"""Header of the marker messages a reader appends to the log to know where "now" ends."""

ORIGINAL_KEY_HEADER = "x-squadbus-routing-key"
"""Header of a log message copied into a new group's queue: the routing key it was published with."""


def routing_key(subject: str) -> str:
    """The routing key of ``subject`` (the subject itself); InvalidSubject past the AMQP limit."""
    if len(subject) > MAX_SHORTSTR // 4 and len(subject.encode()) > MAX_SHORTSTR:
        raise InvalidSubject(
            f"subject {subject[:40]!r}... is {len(subject.encode())} bytes in UTF-8; "
            f"RabbitMQ routing keys hold at most {MAX_SHORTSTR}"
        )
    return subject


def binding_key(pattern: str) -> str:
    """The topic-exchange binding key for a (valid) NATS-style ``pattern``."""
    tokens = ["#" if t == ">" else "*" if t in ("*", "#") else t for t in pattern.split(".")]
    key = ".".join(tokens)
    if len(key.encode()) > MAX_SHORTSTR:
        raise InvalidSubject(f"pattern {pattern[:40]!r}... is longer than {MAX_SHORTSTR} bytes in UTF-8")
    return key


def needs_filter(pattern: str) -> bool:
    """True when the binding of ``pattern`` is wider than the pattern (a literal ``#`` token)."""
    return "#" in pattern.split(".")


def short_name(name: str) -> str:
    """``name`` if it fits an AMQP short string, else a prefix of it and a hash of the whole."""
    if len(name.encode()) <= MAX_SHORTSTR:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:16]
    cut = name.encode()[:200].decode(errors="ignore")
    return f"{cut}-{digest}"


def group_queue_arguments(single_active_consumer: bool = False, *, classic: bool = False) -> dict[str, Any]:
    """A group's queue: quorum (replicated, fsynced before the confirm, counts deliveries), or classic
    (``profile=fast``: in memory, no delivery count), with ``x-single-active-consumer`` when the URL
    asks for it. The type is always named, so a queue declared under the other profile is refused.

    Nothing that depends on a subscription's options goes here: every member
    declares the queue, and RabbitMQ refuses a second declaration whose
    arguments differ.
    """
    arguments: dict[str, Any] = {"x-queue-type": "classic" if classic else "quorum"}
    if single_active_consumer:
        arguments["x-single-active-consumer"] = True
    return arguments


def inbox_queue_arguments(*, classic: bool = False, max_age: float = 0.0) -> dict[str, Any]:
    """An inbox partition queue: quorum (classic under ``profile=fast``), one active consumer at a time
    (the Bus reading it; another Bus consuming it is a standby that takes over when the first goes), and
    the log's retention ``max_age`` (s, 0 = none) as message TTL: what no Bus reads (an agent whose
    partition has no reader) does not pile up for ever."""
    arguments: dict[str, Any] = {"x-queue-type": "classic" if classic else "quorum", "x-single-active-consumer": True}
    if max_age > 0:
        arguments["x-message-ttl"] = max(1000, int(max_age * 1000))
    return arguments


INBOX_ROUTE_PREFIX = "_inbox"
"""Binding keys of the inbox partition queues: ``_inbox.<partition>`` (no squad subject starts so)."""

_DIRECT_PREFIX = subjects.direct("x")[:-1]


def inbox_partition(agent_id: str, partitions: int) -> int:
    """The inbox partition of ``agent_id``: ``crc32(agent id) % partitions`` (the same in every process)."""
    return zlib.crc32(agent_id.encode()) % partitions


def inbox_route(partition: int) -> str:
    """The routing key (a publish's ``CC``) and binding key of inbox partition ``partition``."""
    return f"{INBOX_ROUTE_PREFIX}.{partition}"


def direct_recipient(subject: str) -> str | None:
    """The agent of a direct subject (``agent.message.<agent>``), else None (broadcasts, replies, ...)."""
    if not subject.startswith(_DIRECT_PREFIX):
        return None
    agent = subject[len(_DIRECT_PREFIX):]
    if not agent or "." in agent or agent in subjects.RESERVED_AGENT_IDS:
        return None
    return agent


def log_queue_arguments(max_age: float, max_bytes: int) -> dict[str, Any]:
    """The log: a stream queue, read by offset without consuming it."""
    arguments: dict[str, Any] = {"x-queue-type": "stream"}
    if max_age > 0:
        arguments["x-max-age"] = f"{max(1, int(max_age))}s"
    if max_bytes > 0:
        arguments["x-max-length-bytes"] = max_bytes
    return arguments
