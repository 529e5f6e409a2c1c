"""Squad agents for the A2A tests: they live on the bus, not in HTTP, like any squad agent."""

from __future__ import annotations

from squadbus.core import subjects
from squadbus.core.backend import Delivery, Subscription
from squadbus.core.bus import Bus
from squadbus.service.a2a import Skill, declare

ECHO = "echo"
"""Answers every task: a ``working`` status, then a ``reply`` (completed) ``echo: <text>``."""
ASKER = "asker"
"""Asks for input first (``input-required``), then completes with what it was told."""
SLOW = "slow"
"""Only says ``working``: a task for CancelTask."""


async def run_agents(bus: Bus) -> list[Subscription]:
    """Declare the three agents A2A-reachable and start answering on ``bus``."""

    async def echo(delivery: Delivery) -> None:
        m = delivery.message
        if m.message_type in ("a2a.task", "a2a.message"):
            execution = m.task_execution_id
            await bus.send(ECHO, m.sender_id, "on it", "working", task_execution_id=execution)
            await bus.send(ECHO, m.sender_id, f"echo: {m.content}", "reply", task_execution_id=execution)

    async def asker(delivery: Delivery) -> None:
        m = delivery.message
        if m.message_type == "a2a.task":
            await bus.send(ASKER, m.sender_id, "which colour?", "input-required", task_execution_id=m.task_execution_id)
        elif m.message_type == "a2a.message":
            await bus.send(ASKER, m.sender_id, f"painted {m.content}", "reply", task_execution_id=m.task_execution_id)

    async def slow(delivery: Delivery) -> None:
        m = delivery.message
        if m.message_type == "a2a.task":
            await bus.send(SLOW, m.sender_id, "thinking", "working", task_execution_id=m.task_execution_id)

    subs = [
        await bus.subscribe(subjects.direct(ECHO), echo, group="agent-echo"),
        await bus.subscribe(subjects.direct(ASKER), asker, group="agent-asker"),
        await bus.subscribe(subjects.direct(SLOW), slow, group="agent-slow"),
    ]
    await declare(bus, ECHO, description="Echoes what it is told",
                  skills=[Skill(id="echo", name="Echo", description="Repeats the text", tags=("test",),
                                examples=("hello",))])
    await declare(bus, ASKER, description="Asks a question before answering")
    await declare(bus, SLOW, description="Works forever, until canceled")
    return subs
