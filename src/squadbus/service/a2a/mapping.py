"""squadbus messages of an execution → one A2A Task, and each message → one A2A stream event.

A Task is never stored as such: it is folded from its execution's messages,
in seq order, by :class:`TaskView`. Who sent a message decides its role:

* ``a2a.task`` / ``a2a.message`` (:data:`CLIENT_TYPES`): the A2A client's
  messages, role ``user``; state ``submitted`` (the agent has not answered);
* ``a2a.cancel``: a CancelTask, sent to the agent; state ``canceled``;
* ``a2a.push.set`` / ``a2a.push.delete``: push notification configs (:mod:`.push`), nothing else;
* anything else in the execution is the agent's, role ``agent``; its
  ``message_type`` sets the state by :data:`STATE_BY_TYPE` (other types leave
  it, or make a ``submitted`` task ``working``); ``artifact`` adds an artifact.

A terminal state (completed, failed, canceled, rejected) is final: later
messages still join the history but do not change it. Stream events carry
``squadbus.seq`` in their metadata: the SSE event id, for ``Last-Event-ID``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from a2a.types import (
    Artifact,
    Part,
    Role,
    StreamResponse,
    Task,
    TaskArtifactUpdateEvent,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from a2a.types import Message as A2AMessage
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from google.protobuf.struct_pb2 import Struct

from squadbus.core.envelope import Message
from squadbus.store.base import StoredMessage

OPEN_TYPE = "a2a.task"
"""``message_type`` of the client message that opens a task."""
FOLLOW_UP_TYPE = "a2a.message"
"""``message_type`` of a client message to an existing task (after ``input-required``)."""
CANCEL_TYPE = "a2a.cancel"
"""``message_type`` of the cancel request the edge sends the agent on CancelTask."""
ARTIFACT_TYPE = "artifact"
"""An agent message of this type is a Task artifact (``metadata.name`` names it)."""
CLIENT_TYPES = frozenset({OPEN_TYPE, FOLLOW_UP_TYPE})
PUSH_SET_TYPE = "a2a.push.set"
"""``message_type`` of a push notification config set for the task (from the client to the edge)."""
PUSH_DELETE_TYPE = "a2a.push.delete"
"""``message_type`` of a push notification config deleted."""
CONTROL_TYPES = frozenset({PUSH_SET_TYPE, PUSH_DELETE_TYPE})
"""Messages of the execution that are neither history nor a state change."""

STATE_BY_TYPE: Mapping[str, int] = {
    "working": TaskState.TASK_STATE_WORKING,
    "status": TaskState.TASK_STATE_WORKING,
    "progress": TaskState.TASK_STATE_WORKING,
    "reply": TaskState.TASK_STATE_COMPLETED,
    "result": TaskState.TASK_STATE_COMPLETED,
    "completed": TaskState.TASK_STATE_COMPLETED,
    "input-required": TaskState.TASK_STATE_INPUT_REQUIRED,
    "auth-required": TaskState.TASK_STATE_AUTH_REQUIRED,
    "failed": TaskState.TASK_STATE_FAILED,
    "error": TaskState.TASK_STATE_FAILED,
    "rejected": TaskState.TASK_STATE_REJECTED,
    "canceled": TaskState.TASK_STATE_CANCELED,
    CANCEL_TYPE: TaskState.TASK_STATE_CANCELED,
}
"""The A2A task state an agent's message of each ``message_type`` sets."""

TERMINAL = frozenset({TaskState.TASK_STATE_COMPLETED, TaskState.TASK_STATE_FAILED,
                      TaskState.TASK_STATE_CANCELED, TaskState.TASK_STATE_REJECTED})
INTERRUPTED = frozenset({TaskState.TASK_STATE_INPUT_REQUIRED, TaskState.TASK_STATE_AUTH_REQUIRED})
SEQ_KEY = "squadbus.seq"


@dataclass(frozen=True, slots=True)
class Entry:
    """The fields of one stored message the mapping reads (from a row or an SSE payload)."""

    id: str
    seq: int
    sender_id: str
    recipient_id: str | None
    message_type: str
    content: str
    metadata: dict[str, Any]
    created_at: datetime

    @classmethod
    def of_row(cls, row: StoredMessage) -> Entry:
        """From a store row."""
        m: Message = row.message
        return cls(str(m.id), row.seq, m.sender_id, m.recipient_id, m.message_type, m.content,
                   dict(m.metadata), m.created_at)

    @classmethod
    def of_payload(cls, data: Mapping[str, Any]) -> Entry:
        """From the JSON of an SSE ``message`` event (``MessageOut``)."""
        created = datetime.fromisoformat(str(data["created_at"]).replace("Z", "+00:00"))
        return cls(str(data["id"]), int(data["seq"]), str(data["sender_id"]), data.get("recipient_id"),
                   str(data["message_type"]), str(data["content"]), dict(data.get("metadata") or {}), created)


def a2a_meta(entry: Entry) -> dict[str, Any]:
    """The ``a2a`` object of a client message's metadata (message id, context id, non-text parts)."""
    raw = entry.metadata.get("a2a")
    return raw if isinstance(raw, dict) else {}


def _struct(values: Mapping[str, Any]) -> Struct:
    s = Struct()
    s.update(dict(values))
    return s


def to_a2a_message(entry: Entry, task_id: str, context_id: str) -> A2AMessage:
    """The A2A Message of a stored client or agent message."""
    client = entry.message_type in CLIENT_TYPES
    meta = a2a_meta(entry) if client else {}
    parts: list[Part] = []
    if entry.content:
        parts.append(Part(text=entry.content))
    for raw in meta.get("parts") or ():
        try:
            parts.append(ParseDict(raw, Part()))
        except (ParseError, TypeError):
            continue  # stored by this edge from a parsed Part: only a hand-written row can fail
    message = A2AMessage(
        message_id=str(meta.get("message_id") or entry.id), context_id=context_id, task_id=task_id,
        role=Role.ROLE_USER if client else Role.ROLE_AGENT, parts=parts,
    )
    message.metadata.CopyFrom(_struct({SEQ_KEY: entry.seq, "squadbus.sender_id": entry.sender_id}))
    return message


@dataclass
class TaskView:
    """A Task folded from its execution's messages (feed them in seq order with :meth:`apply`)."""

    task_id: UUID
    context_id: str = ""
    agent_id: str = ""
    client_id: str = ""
    state: int = TaskState.TASK_STATE_SUBMITTED
    status_message: A2AMessage | None = None
    updated_at: datetime | None = None
    history: list[A2AMessage] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)
    last_seq: int = 0
    opened: bool = False

    @property
    def terminal(self) -> bool:
        """Completed, failed, canceled or rejected: nothing changes it any more."""
        return self.state in TERMINAL

    @property
    def final_for_stream(self) -> bool:
        """A stream ends here: a terminal or interrupted (input/auth required) state."""
        return self.state in TERMINAL or self.state in INTERRUPTED

    def apply(self, entry: Entry) -> StreamResponse | None:
        """Fold ``entry`` in; returns the stream event it makes (None for a client message)."""
        if entry.seq <= self.last_seq:
            return None
        self.last_seq = entry.seq
        if entry.message_type == OPEN_TYPE and not self.opened:
            self.opened = True
            self.context_id = str(a2a_meta(entry).get("context_id") or self.task_id)
            self.agent_id = entry.recipient_id or ""
            self.client_id = entry.sender_id
        tid, cid = str(self.task_id), self.context_id
        if entry.message_type in CONTROL_TYPES:
            return None
        if entry.message_type in CLIENT_TYPES:
            self.history.append(to_a2a_message(entry, tid, cid))
            if not self.terminal:
                self._set(TaskState.TASK_STATE_SUBMITTED, None, entry.created_at)
            return None
        if entry.message_type == CANCEL_TYPE:
            if not self.terminal:
                self._set(TaskState.TASK_STATE_CANCELED, None, entry.created_at)
            return self._status_event(entry.seq)
        message = to_a2a_message(entry, tid, cid)
        self.history.append(message)
        if entry.message_type == ARTIFACT_TYPE:
            artifact = Artifact(artifact_id=entry.id, name=str(entry.metadata.get("name") or ""),
                                parts=list(message.parts))
            self.artifacts.append(artifact)
            if self.state == TaskState.TASK_STATE_SUBMITTED:
                self._set(TaskState.TASK_STATE_WORKING, None, entry.created_at)
            event = TaskArtifactUpdateEvent(task_id=tid, context_id=cid, artifact=artifact, last_chunk=True)
            event.metadata.CopyFrom(_struct({SEQ_KEY: entry.seq}))
            return StreamResponse(artifact_update=event)
        if not self.terminal:
            state = STATE_BY_TYPE.get(entry.message_type)
            if state is None:
                state = TaskState.TASK_STATE_WORKING if self.state == TaskState.TASK_STATE_SUBMITTED else self.state
            self._set(state, message, entry.created_at)
        return self._status_event(entry.seq, message)

    def _set(self, state: int, message: A2AMessage | None, at: datetime) -> None:
        self.state = state
        self.status_message = message
        self.updated_at = at

    def _status(self, message: A2AMessage | None = None) -> TaskStatus:
        status = TaskStatus(state=self.state)  # type: ignore[arg-type]  # the enum values are ints
        shown = message if message is not None else self.status_message
        if shown is not None:
            status.message.CopyFrom(shown)
        status.timestamp.FromDatetime(self.updated_at or datetime.now(UTC))
        return status

    def _status_event(self, seq: int, message: A2AMessage | None = None) -> StreamResponse:
        event = TaskStatusUpdateEvent(task_id=str(self.task_id), context_id=self.context_id,
                                      status=self._status(message))
        event.metadata.CopyFrom(_struct({SEQ_KEY: seq}))
        return StreamResponse(status_update=event)

    def task(self, history_length: int | None = None) -> Task:
        """The Task now; ``history_length`` keeps the last N history messages (0: none, None: all)."""
        history = self.history if history_length is None else self.history[-history_length:] if history_length else []
        task = Task(id=str(self.task_id), context_id=self.context_id, status=self._status(),
                    artifacts=self.artifacts, history=history)
        task.metadata.CopyFrom(_struct({SEQ_KEY: self.last_seq, "squadbus.agent_id": self.agent_id,
                                        "squadbus.client_id": self.client_id}))
        return task


def to_json(message: Any) -> dict[str, Any]:
    """A protobuf message as the JSON the A2A JSON binding uses (camelCase)."""
    result: dict[str, Any] = MessageToDict(message, preserving_proto_field_name=False)
    return result
