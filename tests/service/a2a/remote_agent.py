"""A remote A2A agent built with the a2a-sdk server, in its own process.

Run as ``python -m tests.service.a2a.remote_agent PORT``.

"weather": answers ``<city>`` with a working status, an artifact ``sunny in <city>`` and completed;
answers ``forecast`` (no city) with input-required ``which city?``, then the city as above.
"""

from __future__ import annotations

import sys

import uvicorn
from a2a.server.agent_execution.agent_executor import AgentExecutor
from a2a.server.agent_execution.context import RequestContext
from a2a.server.events.event_queue import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks.inmemory_task_store import InMemoryTaskStore
from a2a.server.tasks.task_updater import TaskUpdater
from a2a.types import AgentCapabilities, AgentCard, AgentInterface, AgentSkill, Part, Task, TaskState, TaskStatus
from starlette.applications import Starlette


class Weather(AgentExecutor):
    """The weather agent (see the module docstring)."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        message, task_id, context_id = context.message, context.task_id, context.context_id
        if message is None or not task_id or not context_id:
            return
        if context.current_task is None:
            await event_queue.enqueue_event(Task(id=task_id, context_id=context_id, history=[message],
                                                 status=TaskStatus(state=TaskState.TASK_STATE_SUBMITTED)))
        updater = TaskUpdater(event_queue=event_queue, task_id=task_id, context_id=context_id)
        text = context.get_user_input().strip()
        if text == "forecast":
            await updater.requires_input(message=updater.new_agent_message(parts=[Part(text="which city?")]))
            return
        await updater.start_work(message=updater.new_agent_message(parts=[Part(text="looking at the sky")]))
        await updater.add_artifact(parts=[Part(text=f"sunny in {text}")], name="forecast", last_chunk=True)
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        updater = TaskUpdater(event_queue=event_queue, task_id=context.task_id or "",
                              context_id=context.context_id or "")
        await updater.cancel()


def app(port: int) -> Starlette:
    """The agent's card and JSON-RPC endpoint."""
    card = AgentCard(
        name="weather", description="Says what the sky will do",
        supported_interfaces=[AgentInterface(url=f"http://127.0.0.1:{port}/", protocol_binding="JSONRPC",
                                             protocol_version="1.0")],
        version="1.0", capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text/plain"], default_output_modes=["text/plain"],
        skills=[AgentSkill(id="forecast", name="Forecast", description="The weather of a city", tags=["weather"])],
    )
    handler = DefaultRequestHandler(agent_executor=Weather(), task_store=InMemoryTaskStore(), agent_card=card)
    return Starlette(routes=[*create_agent_card_routes(card), *create_jsonrpc_routes(handler, "/")])


if __name__ == "__main__":
    port = int(sys.argv[1])
    uvicorn.run(app(port), host="127.0.0.1", port=port, log_level="warning")
