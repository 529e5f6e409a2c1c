"""A faithful re-implementation of the guide's in-memory ``MessageBus`` (the baseline we must beat).

From ``spec/scaling-architecture-guide.md``, "Current Architecture": one
``asyncio.Lock`` around every send, per-agent ``deque(maxlen=1000)`` queues, a
broadcast copied into every queue, a ``deque(maxlen=10000)`` of all messages
(the silent cap), subscriber callbacks awaited inside the lock, and a
pydantic response model built per message. Only the database and SSE steps
are left out (they are ``None`` in the guide's in-memory path too).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

from pydantic import BaseModel

Callback = Callable[["AgentMessageResponse"], Awaitable[None]]


class AgentMessageResponse(BaseModel):
    """The guide's response schema."""

    id: UUID
    task_execution_id: UUID | None = None
    sender_id: UUID
    recipient_id: UUID | None = None
    content: str
    message_type: str
    message_metadata: dict[str, Any] = {}
    created_at: datetime


class GuideMessageBus:
    """The guide's MessageBus, as written there (minus the DB and SSE calls)."""

    def __init__(self) -> None:
        self._queues: dict[UUID, deque[AgentMessageResponse]] = defaultdict(lambda: deque(maxlen=1000))
        self._broadcast_queue: deque[AgentMessageResponse] = deque(maxlen=1000)
        self._subscribers: dict[UUID, list[Callback]] = defaultdict(list)
        self._all_messages: deque[AgentMessageResponse] = deque(maxlen=10000)
        self._lock = asyncio.Lock()

    def register(self, agent_id: UUID) -> None:
        """Create the agent's queue (the guide creates it on first use via defaultdict)."""
        _ = self._queues[agent_id]

    def subscribe(self, agent_id: UUID, callback: Callback) -> None:
        """Real-time callback for messages to ``agent_id``."""
        self._subscribers[agent_id].append(callback)

    async def send_message(
        self,
        sender_id: UUID,
        recipient_id: UUID | None,
        content: str,
        message_type: str,
        task_execution_id: UUID | None = None,
    ) -> AgentMessageResponse:
        """The guide's send path."""
        async with self._lock:
            message = AgentMessageResponse(
                id=uuid4(), task_execution_id=task_execution_id, sender_id=sender_id,
                recipient_id=recipient_id, content=content, message_type=message_type,
                created_at=datetime.utcnow(),  # as the guide does (naive UTC)
            )
            self._all_messages.append(message)
            if recipient_id:
                self._queues[recipient_id].append(message)
            else:
                self._broadcast_queue.append(message)
                for queue in self._queues.values():
                    queue.append(message)
            await self._notify_subscribers(recipient_id, message)
            return message

    async def _notify_subscribers(self, recipient_id: UUID | None, message: AgentMessageResponse) -> None:
        if recipient_id is not None:
            for callback in self._subscribers.get(recipient_id, ()):
                await callback(message)
        else:
            for callbacks in self._subscribers.values():
                for callback in callbacks:
                    await callback(message)
