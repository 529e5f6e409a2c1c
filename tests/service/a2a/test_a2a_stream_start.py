"""A stream's first event is the Task as of the message that opened it, whatever the agent did since.

SendStreamingMessage stores the client's message, then reads the task to start the stream. A fast agent
may have answered (and the db-writer stored the answer) in between; the snapshot then said COMPLETED and
the events after it said WORKING, COMPLETED again (seen once under load in test_a2a_edge)."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

import pytest
from a2a.types import SendMessageRequest
from a2a.types import TaskState as S

from squadbus.service.a2a.tasks import TaskService, fold, rows_of
from tests.service.a2a.conftest import InProcess
from tests.service.a2a.test_a2a_edge import client_for, seq_of, text_message


async def test_the_snapshot_is_the_task_before_the_events_that_follow(
    inproc: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = inproc.app.state.service
    send = TaskService.send

    async def send_then_let_the_agent_finish(self: TaskService, *args: Any, **kwargs: Any) -> tuple[UUID, int]:
        task_id, seq = await send(self, *args, **kwargs)
        for _ in range(500):  # the agent answers and its answer is stored before the edge reads the task
            if fold(task_id, await rows_of(service, task_id)).terminal:
                return task_id, seq
            await asyncio.sleep(0.02)
        raise AssertionError("the echo agent never finished")

    monkeypatch.setattr(TaskService, "send", send_then_let_the_agent_finish)
    async with client_for(inproc.url, "pm", streaming=True) as pm:
        events = [e async for e in pm.send_message(SendMessageRequest(message=text_message("quick")))]
    assert [e.WhichOneof("payload") for e in events] == ["task", "status_update", "status_update"]
    assert events[0].task.status.state == S.TASK_STATE_SUBMITTED
    assert int(events[0].task.metadata["squadbus.seq"]) == 1
    assert [e.status_update.status.state for e in events[1:]] == [S.TASK_STATE_WORKING, S.TASK_STATE_COMPLETED]
    assert [seq_of(e) for e in events[1:]] == [2, 3]
