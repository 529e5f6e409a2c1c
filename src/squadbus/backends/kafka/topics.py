"""Topic layout: which subjects live in which topic, and topic creation.

The topics (names from :class:`KafkaSettings`):

* ``dlq_topic``   ``agent.dlq.>``   dead letters of every group;
* ``reply_topic`` ``agent.reply.>`` replies to requests (read by short-lived
  ephemeral consumers, kept apart so they do not scan all traffic);
* ``topic``       everything else: ``agent.message.<agent>``, domain and squad
  broadcasts, and any other subject;
* ``inbox_topic`` (with ``inboxes`` on) a second copy of each direct message
  ``agent.message.<agent>``, keyed by the recipient, read only by the inbox
  group (:mod:`.inboxes`); no subscription pattern reads it;
* ``broadcast_topic`` (with ``broadcasts_apart`` on) a second copy of each
  squad and domain broadcast (``agent.message.broadcast``,
  ``agent.message.domain.<domain>[.<more>]``), keyed as in the main topic;
  ``broadcast_partitions`` partitions (1) when squadbus creates it.

A subscription consumes every topic its pattern can match (``agent.>``
reads main, replies and dead letters, ``agent.message.>`` only the main
topic) and filters records client-side by the subject header with
:func:`squadbus.core.subjects.matches`. A pattern that matches broadcasts
only (``agent.message.broadcast``, ``agent.message.domain.>``) reads the
broadcast topic instead of the main one when there is one: every subject it
can match has its copy there, and it skips the squad's direct messages
(a Bus's broadcast hub read the whole main topic on every host, 280 records/s
in scenario 5, to keep a few broadcasts; docs/scaling.md).
"""

from __future__ import annotations

import logging

from squadbus.backends.kafka._driver import AIOKafkaAdminClient, KafkaError, NewTopic
from squadbus.backends.kafka.settings import KafkaSettings
from squadbus.core import subjects

logger = logging.getLogger("squadbus.backends.kafka")

ROUTES_REMEMBERED = 65_536
_TOPIC_ALREADY_EXISTS = 36
_DLQ_TOKENS = ("agent", "dlq")
_REPLY_TOKENS = ("agent", "reply")
_DIRECT_PREFIX = subjects.MESSAGE_PREFIX + "."
_DOMAIN_TOKENS = tuple(subjects.DOMAIN_PREFIX.split("."))


def _prefix_could_match(pattern: str, prefix: tuple[str, str]) -> bool:
    """True when ``pattern`` can match a subject of the form ``<prefix>.<more>``."""
    tokens = pattern.split(".")
    for i, wanted in enumerate(prefix):
        if i >= len(tokens):
            return False
        if tokens[i] == ">":
            return True
        if tokens[i] not in ("*", wanted):
            return False
    return len(tokens) > len(prefix)


def _inside_prefix(pattern: str, prefix: tuple[str, ...]) -> bool:
    """True when every subject ``pattern`` matches starts with ``<prefix>.``."""
    tokens = pattern.split(".")
    return len(tokens) > len(prefix) and tuple(tokens[: len(prefix)]) == prefix


def broadcasts_only(pattern: str) -> bool:
    """True when every subject ``pattern`` matches is a broadcast (:func:`~squadbus.core.subjects.is_broadcast`)."""
    return pattern == subjects.BROADCAST or _inside_prefix(pattern, _DOMAIN_TOKENS)


class TopicLayout:
    """Maps subjects to topics and subscription patterns to the topics to read."""

    __slots__ = ("_routes", "broadcasts", "dlq", "inbox", "main", "replies")

    def __init__(self, settings: KafkaSettings) -> None:
        self.main = settings.topic
        self.replies = settings.reply_topic
        self.dlq = settings.dlq_topic
        self.inbox = settings.inbox_topic if settings.inboxes else None
        self.broadcasts = settings.broadcast_topic if settings.broadcasts_apart else None
        self._routes: dict[str, tuple[str, str | None, bytes | None]] = {}

    @property
    def all(self) -> tuple[str, ...]:
        """Every topic a subscription pattern can read (not the inbox topic, read by the inbox group only)."""
        return (self.main, self.replies, self.dlq) + ((self.broadcasts,) if self.broadcasts else ())

    def topic_for(self, subject: str) -> str:
        """The topic a message published on ``subject`` goes to."""
        if subject.startswith(subjects.DLQ_PREFIX + "."):
            return self.dlq
        if subject.startswith(subjects.REPLY_PREFIX + "."):
            return self.replies
        return self.main

    def inbox_recipient(self, subject: str) -> str | None:
        """The agent whose inbox copy a message on ``subject`` gets: the recipient of a direct
        subject ``agent.message.<agent>`` when the layout has an inbox topic, else None."""
        if self.inbox is None or not subject.startswith(_DIRECT_PREFIX):
            return None
        agent = subject[len(_DIRECT_PREFIX):]
        return None if "." in agent or agent in subjects.RESERVED_AGENT_IDS else agent

    def copy_for(self, subject: str) -> tuple[str, bytes | None] | None:
        """The second record a message on ``subject`` gets, as ``(topic, key)``: the inbox copy keyed by
        its recipient (:meth:`inbox_recipient`), the broadcast copy (key None: the main record's key), or
        None."""
        recipient = self.inbox_recipient(subject)
        if recipient is not None:
            assert self.inbox is not None
            return self.inbox, recipient.encode()
        if self.broadcasts is not None and subjects.is_broadcast(subject):
            return self.broadcasts, None
        return None

    def route(self, subject: str) -> tuple[str, str | None, bytes | None]:
        """Where a message on ``subject`` is written: its topic, then the topic and key of its copy
        (:meth:`copy_for`; both None when it has none). Remembered per subject (the publish path asks
        once per message; a squad has few subjects per agent), at most ``ROUTES_REMEMBERED`` of them."""
        found = self._routes.get(subject)
        if found is None:
            if len(self._routes) >= ROUTES_REMEMBERED:
                self._routes.clear()  # bounded memory; a forgotten subject costs one more lookup
            copy = self.copy_for(subject)
            found = self._routes[subject] = (self.topic_for(subject), *(copy or (None, None)))
        return found

    def topics_for(self, pattern: str) -> list[str]:
        """The topics a subscription to ``pattern`` must read (at least one)."""
        if self.broadcasts is not None and broadcasts_only(pattern):
            return [self.broadcasts]
        found = []
        in_dlq, in_replies = _inside_prefix(pattern, _DLQ_TOKENS), _inside_prefix(pattern, _REPLY_TOKENS)
        if not in_dlq and not in_replies:
            found.append(self.main)
        if _prefix_could_match(pattern, _REPLY_TOKENS):
            found.append(self.replies)
        if _prefix_could_match(pattern, _DLQ_TOKENS):
            found.append(self.dlq)
        return found


async def ensure_topics(admin: AIOKafkaAdminClient, settings: KafkaSettings) -> list[str]:
    """Create the layout's topics that do not exist yet; returns the names created.

    Existing topics keep their partition count and retention.
    """
    config = {"retention.ms": str(settings.retention_ms)}
    wanted = [
        NewTopic(name, settings.partitions_of(name), settings.replication_factor, topic_configs=config)
        for name in settings.topics
    ]
    response = await admin.create_topics(wanted)
    created = []
    for topic, code, message in (item[:3] for item in response.topic_errors):
        if code == 0:
            created.append(topic)
        elif code != _TOPIC_ALREADY_EXISTS:
            raise KafkaError(f"creating topic {topic!r} failed with error {code}: {message}")
    if created:
        logger.info(
            "created topics %s (replication %d, retention.ms %d)",
            ", ".join(f"{name} ({settings.partitions_of(name)} partitions)" for name in created),
            settings.replication_factor, settings.retention_ms,
        )
    return created
