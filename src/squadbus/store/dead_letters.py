"""Dead letters kept for people to look at, re-drive or discard (:class:`KeepsDeadLetters`).

A dead letter is the message the dispatch loop publishes on ``agent.dlq.<group>``
when a group gives up on a delivery: a copy of the original envelope with a new
id, the dead-letter subject, and the reason, group, attempts, original subject
and original id in its headers (``dlq-*``, see :mod:`squadbus.core.dispatch`).
The history (``messages``) does not keep these copies; a store that
:class:`KeepsDeadLetters` keeps them in a table of their own, one row per
dead-letter id, with a state:

* ``dead``: waiting for someone (listed by default);
* ``redriven``: published again to its original subject as ``redriven_as``;
* ``discarded``: an admin decided it needs nothing more.

A row leaves ``dead`` once (:meth:`KeepsDeadLetters.settle_dead_letter` is a
compare-and-set), so two admins re-driving the same dead letter publish it once.
Retention (``delete_older_than``) removes kept dead letters stored before its
cutoff, whatever their state, as it removes history.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable
from uuid import UUID

from squadbus.core import subjects
from squadbus.core.dispatch import DLQ_ATTEMPTS, DLQ_GROUP, DLQ_ORIGINAL_ID, DLQ_REASON, DLQ_SUBJECT
from squadbus.core.envelope import Message
from squadbus.store.base import InvalidQuery

MAX_DEAD_LETTER_LIMIT = 500
_DLQ = subjects.DLQ_PREFIX + "."


class DeadLetterState(enum.Enum):
    """Where a kept dead letter stands."""

    DEAD = "dead"
    REDRIVEN = "redriven"
    DISCARDED = "discarded"


@dataclass(frozen=True, slots=True)
class DeadLetterFacts:
    """What the ``dlq-*`` headers of a dead letter say (see :func:`facts_of`)."""

    group: str
    reason: str
    attempts: int | None
    original_subject: str | None
    original_id: str | None


def facts_of(message: Message) -> DeadLetterFacts:
    """Read a dead letter's headers; the group falls back to the subject's last token.

    Tolerant on purpose: a dead letter published by something else than squadbus's
    dispatch (or an older version) is still kept, with what it says.
    """
    headers = message.headers
    group = headers.get(DLQ_GROUP) or (message.subject[len(_DLQ):] if message.subject.startswith(_DLQ) else "")
    raw_attempts = headers.get(DLQ_ATTEMPTS, "")
    attempts = int(raw_attempts) if raw_attempts.isdigit() else None
    return DeadLetterFacts(
        group=group or "unknown",
        reason=headers.get(DLQ_REASON, ""),
        attempts=attempts,
        original_subject=headers.get(DLQ_SUBJECT) or None,
        original_id=headers.get(DLQ_ORIGINAL_ID) or None,
    )


def is_dead_letter(message: Message) -> bool:
    """True for a message on ``agent.dlq.<group>``."""
    return message.subject.startswith(_DLQ)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One kept dead letter: the message as published on ``agent.dlq.<group>``, what its headers say, its state.

    ``position`` orders the rows (newest first in lists); ``settled_*`` and
    ``redriven_as`` are set when it left ``dead``.
    """

    message: Message
    facts: DeadLetterFacts
    stored_at: datetime
    position: int
    state: DeadLetterState
    settled_at: datetime | None = None
    settled_by: str | None = None
    redriven_as: UUID | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetterQuery:
    """Filters of :meth:`KeepsDeadLetters.list_dead_letters`: newest first; ``cursor`` from ``next_cursor``."""

    group: str | None = None
    state: DeadLetterState | None = DeadLetterState.DEAD
    cursor: str | None = None
    limit: int = 100

    def validate(self) -> None:
        """Raise InvalidQuery for a limit out of 1..MAX_DEAD_LETTER_LIMIT."""
        if not 1 <= self.limit <= MAX_DEAD_LETTER_LIMIT:
            raise InvalidQuery(f"limit must be between 1 and {MAX_DEAD_LETTER_LIMIT}, got {self.limit}")


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    """One page of dead letters; ``next_cursor`` None when there is no more."""

    items: list[DeadLetter]
    next_cursor: str | None


@runtime_checkable
class KeepsDeadLetters(Protocol):
    """A store that keeps dead letters (see the module docstring).

    ``keep_dead_letters`` is idempotent by the dead letter's id (a redelivered
    dead letter is kept once) and returns how many were new.
    ``settle_dead_letter`` moves a ``dead`` row to ``state`` and returns True,
    or returns False when the row is missing or already settled.
    ``reopen_dead_letter`` undoes a re-drive whose publish failed (only while
    ``redriven_as`` is still ``redriven_as``). ``dead_letter_counts`` counts the
    dead letters that died at or after ``since`` by group, whatever their state.
    """

    async def keep_dead_letters(self, messages: Sequence[Message]) -> int:
        """Keep ``messages`` (dead letters; others are ignored), once per id; returns how many were new."""
        ...

    async def get_dead_letter(self, dead_letter_id: UUID) -> DeadLetter | None:
        """The kept dead letter with this id (the id of the message on ``agent.dlq.<group>``), or None."""
        ...

    async def list_dead_letters(self, q: DeadLetterQuery) -> DeadLetterPage:
        """One page of kept dead letters matching ``q``, newest first."""
        ...

    async def settle_dead_letter(self, dead_letter_id: UUID, state: DeadLetterState, *, by: str,
                                 redriven_as: UUID | None = None) -> bool:
        """Move a ``dead`` row to ``state`` (compare-and-set); False when missing or already settled."""
        ...

    async def reopen_dead_letter(self, dead_letter_id: UUID, redriven_as: UUID) -> bool:
        """Put a row re-driven as ``redriven_as`` back to ``dead`` (its publish failed)."""
        ...

    async def dead_letter_counts(self, since: datetime) -> dict[str, int]:
        """Dead letters created at or after ``since``, by group (every state)."""
        ...
