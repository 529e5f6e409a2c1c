"""Request and response models of the HTTP API (they are also its OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from squadbus.store.base import AgentSummary, ExecutionSnapshot, ExecutionSummary, StoredMessage

MAX_BATCH = 500
TOKEN_PATTERN = r"^[^\x00-\x20\x7f-\xa0.*>]+$"
"""The part of the subject-token rule a JSON Schema pattern can say; the server also refuses every other
character Python's ``str.isprintable`` refuses (Unicode separators, format and unassigned characters)."""
TOKEN_RULE = ("one subject token: printable characters only, no whitespace (Unicode separators included), "
              "control, format (bidi overrides, zero-width) or unassigned characters, and no '.', '*' or '>'")
AGENT_ID = Field(min_length=1, max_length=200, pattern=TOKEN_PATTERN, description=f"Agent id: {TOKEN_RULE}.")


class MessageIn(BaseModel):
    """A message to send. ``recipient_id`` None broadcasts (to ``domain`` when set, else the squad)."""

    model_config = ConfigDict(extra="forbid")

    id: UUID | None = Field(
        default=None, description="Idempotency key: repeating a request with the same id returns the same message."
    )
    sender_id: str = AGENT_ID
    recipient_id: str | None = Field(default=None, min_length=1, max_length=200, pattern=TOKEN_PATTERN,
                                     description=f"Recipient agent id ({TOKEN_RULE}); null broadcasts.")
    domain: str | None = Field(default=None, min_length=1, max_length=200, pattern=TOKEN_PATTERN,
                               description=f"Domain of a broadcast ({TOKEN_RULE}).")
    content: str
    message_type: str = Field(default="message", min_length=1, max_length=200)
    task_execution_id: UUID | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class BatchIn(BaseModel):
    """Up to 500 messages sent in one request; all are validated before any is sent."""

    model_config = ConfigDict(extra="forbid")

    messages: list[MessageIn] = Field(min_length=1, max_length=MAX_BATCH)


class MessageOut(BaseModel):
    """A message as sent, with its place in the history.

    ``seq`` (per execution, the SSE event id) and ``stored_at`` (server clock)
    are null only when the message was published but the store write failed;
    the db-writer stores it later.
    """

    id: UUID
    subject: str
    sender_id: str
    recipient_id: str | None = None
    domain: str | None = None
    content: str
    message_type: str
    task_execution_id: UUID | None = None
    metadata: dict[str, Any]
    headers: dict[str, str]
    created_at: datetime
    seq: int | None
    stored_at: datetime | None

    @classmethod
    def of(cls, row: StoredMessage) -> MessageOut:
        """The API view of a stored message."""
        m = row.message
        return cls(
            id=m.id, subject=m.subject, sender_id=m.sender_id, recipient_id=m.recipient_id, domain=m.domain,
            content=m.content, message_type=m.message_type, task_execution_id=m.task_execution_id,
            metadata=m.metadata, headers=m.headers, created_at=m.created_at, seq=row.seq, stored_at=row.stored_at,
        )


class BatchOut(BaseModel):
    """One result per input message, in input order."""

    items: list[MessageOut]


class MessagePage(BaseModel):
    """One page of history; pass ``next_cursor`` as ``cursor`` for the next page (null: no more)."""

    items: list[MessageOut]
    next_cursor: str | None


class SnapshotOut(BaseModel):
    """The state of one execution; also the data of the first SSE event."""

    task_execution_id: UUID
    message_count: int
    first_seq: int
    last_seq: int
    agents: list[str]
    last_message_at: datetime | None

    @classmethod
    def of(cls, snap: ExecutionSnapshot) -> SnapshotOut:
        """The API view of a store snapshot."""
        return cls(
            task_execution_id=snap.task_execution_id, message_count=snap.message_count,
            first_seq=snap.first_seq, last_seq=snap.last_seq, agents=list(snap.agents),
            last_message_at=snap.last_message_at,
        )


class Health(BaseModel):
    """Liveness / readiness answer."""

    status: str
    checks: dict[str, str] = Field(default_factory=dict)


class ErrorOut(BaseModel):
    """An error: ``detail`` says what was wrong."""

    detail: Any


class ExecutionSummaryOut(BaseModel):
    """One execution in the list: counts, activity times (server ``stored_at``), agents and types seen.

    ``agents`` (senders and direct recipients) and ``message_types`` name the
    first 20 in sorted order; ``agent_count`` and ``message_type_count`` count them all.
    """

    task_execution_id: UUID
    message_count: int
    first_activity_at: datetime
    last_activity_at: datetime
    agents: list[str]
    agent_count: int
    message_types: list[str]
    message_type_count: int

    @classmethod
    def of(cls, item: ExecutionSummary) -> ExecutionSummaryOut:
        """The API view of a store summary."""
        return cls(
            task_execution_id=item.task_execution_id, message_count=item.message_count,
            first_activity_at=item.first_activity_at, last_activity_at=item.last_activity_at,
            agents=list(item.agents), agent_count=item.agent_count, message_types=list(item.message_types),
            message_type_count=item.message_type_count,
        )


class ExecutionList(BaseModel):
    """One page of executions, newest activity first; pass ``next_cursor`` as ``cursor`` (null: no more)."""

    items: list[ExecutionSummaryOut]
    next_cursor: str | None


class AgentOut(BaseModel):
    """An agent seen in the history as sender or direct recipient, or with an inbox on the broker.

    ``domain``: the domain named by the newest of its last 5 sent messages that names one (null when none
    does). ``messages_received`` counts direct messages only. ``last_activity_at``: server ``stored_at`` of
    its newest message, sent or received (null for an agent with no retained message). ``inbox``: ``open``
    (its inbox is open now, in some process), ``known`` (the broker keeps its inbox group; whether anyone
    reads it now, this backend cannot tell), null (none, or the backend cannot tell: see ``AgentList.inboxes``);
    ``inbox_holder`` and ``inbox_since``: who holds the open inbox and since when, where the broker knows.
    """

    agent_id: str
    domain: str | None
    last_activity_at: datetime | None
    messages_sent: int
    messages_received: int
    inbox: Literal["open", "known"] | None = None
    inbox_holder: str | None = None
    inbox_since: datetime | None = None

    @classmethod
    def of(cls, item: AgentSummary) -> AgentOut:
        """The API view of a store summary."""
        return cls(agent_id=item.agent_id, domain=item.domain, last_activity_at=item.last_activity_at,
                   messages_sent=item.messages_sent, messages_received=item.messages_received)


class AgentList(BaseModel):
    """One page of agents by id; pass ``next_cursor`` as ``cursor`` (null: no more).

    ``inboxes``: what ``inbox`` of the items says on this backend: ``open`` (it lists open inboxes),
    ``known`` (it lists inbox groups), ``unavailable`` (it did not answer in time: no ``inbox`` marks),
    ``unreported`` (it cannot tell).
    """

    items: list[AgentOut]
    next_cursor: str | None
    inboxes: Literal["open", "known", "unavailable", "unreported"] = "unreported"


class DeadLetterOut(BaseModel):
    """A dead letter kept by the dead-letter keeper: why and where it died, and what became of it.

    ``id`` is the dead letter's own id (the message on ``agent.dlq.<group>``);
    ``original_id`` and ``original_subject`` name the message that failed
    (``original_id`` is not a UUID for a record that was not a squadbus envelope).
    ``redrivable`` says whether an admin can publish it again to its original subject.
    ``state``: ``dead`` (waiting), ``redriven`` (published again as ``redriven_as``) or ``discarded``.
    ``message`` is the dead letter as published (the original's content, sender and recipient).
    """

    id: UUID
    group: str
    reason: str
    attempts: int | None
    original_subject: str | None
    original_id: str | None
    dead_at: datetime
    stored_at: datetime
    state: str = Field(pattern="^(dead|redriven|discarded)$")
    settled_at: datetime | None
    settled_by: str | None
    redriven_as: UUID | None
    redrivable: bool
    message: MessageOut


class DeadLetterList(BaseModel):
    """One page of dead letters, newest first; pass ``next_cursor`` as ``cursor`` (null: no more)."""

    items: list[DeadLetterOut]
    next_cursor: str | None


class RedrivenOut(BaseModel):
    """One dead letter published again: to ``subject`` as the new message ``redriven_as``."""

    dead_letter_id: UUID
    redriven_as: UUID
    subject: str


class SkippedOut(BaseModel):
    """A dead letter a group re-drive left as it was, and why."""

    dead_letter_id: UUID
    reason: str


class RedriveOut(BaseModel):
    """What a re-drive did."""

    redriven: list[RedrivenOut]
    skipped: list[SkippedOut] = Field(default_factory=list)


class DeadLetterSummary(BaseModel):
    """Dead letters that died at or after ``since`` (every state), in all and by consumer group."""

    since: datetime
    total: int
    by_group: dict[str, int]
