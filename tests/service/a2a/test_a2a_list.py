"""ListTasks over a few hundred tasks: cursor pages through the store's execution index, scoped by the token.

The tasks are opening messages written to the in-process edge's store
(what the edge itself stores for a SendMessage), then listed with the a2a-sdk
client (REST transport) and over JSON-RPC.
"""

from __future__ import annotations

import uuid

import httpx
from a2a.types import ListTasksRequest, TaskState

from squadbus.core import envelope, subjects
from squadbus.core.envelope import Message
from squadbus.service.a2a.mapping import OPEN_TYPE
from tests.service.a2a.conftest import InProcess
from tests.service.a2a.test_a2a_rest import rest_client
from tests.service.conftest import auth


def opening(sender: str, agent: str, n: int, context: str) -> Message:
    """The message that opens an A2A task (as the edge stores it for a SendMessage)."""
    return envelope.build(subject=subjects.direct(agent), sender_id=sender, recipient_id=agent, content=f"job {n}",
                          message_type=OPEN_TYPE, task_execution_id=uuid.uuid4(),
                          metadata={"a2a": {"message_id": f"{sender}-{n}", "context_id": context}})


async def test_list_tasks_pages_a_few_hundred_tasks(inproc: InProcess) -> None:
    store = inproc.app.state.service.store
    pm = [opening("pm", "slow", n, "ctx-a" if n % 4 else "ctx-b") for n in range(200)]
    other = [opening("dev-1", "slow", n, "ctx-a") for n in range(100)]
    for chunk in range(0, 300, 100):
        await store.write((pm + other)[chunk:chunk + 100])
    pm_ids = {str(m.task_execution_id) for m in pm}

    async with rest_client(inproc.url, "pm", agent=None) as client:
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            page = await client.list_tasks(ListTasksRequest(page_size=37, page_token=token))
            pages += 1
            assert page.total_size == 200 and len(page.tasks) <= 37 and page.page_size == 37
            seen += [t.id for t in page.tasks]
            if pages == 2:  # a task already listed gets a message: it moves to the front, never listed twice
                touched = seen[0]
                await store.write([envelope.build(subject=subjects.direct("pm"), sender_id="slow", recipient_id="pm",
                                                  content="on it", message_type="working",
                                                  task_execution_id=uuid.UUID(touched))])
            token = page.next_page_token
            if not token:
                break
        assert pages == 6 and len(seen) == len(set(seen)) == 200 and set(seen) == pm_ids  # no duplicate, no gap
        working = await client.list_tasks(ListTasksRequest(status=TaskState.TASK_STATE_WORKING))
        assert [t.id for t in working.tasks] == [touched]
        ctx_b = await client.list_tasks(ListTasksRequest(context_id="ctx-b", page_size=20))
        assert ctx_b.total_size == 50 and len(ctx_b.tasks) == 20 and {t.context_id for t in ctx_b.tasks} == {"ctx-b"}

    async with httpx.AsyncClient(timeout=30) as h:  # a viewer sees every task; an agent's interface lists its own
        async def listed(url: str, who: str, **params: object) -> dict[str, object]:
            body = {"jsonrpc": "2.0", "id": 1, "method": "ListTasks", "params": params}
            result: dict[str, object] = (await h.post(url, json=body, headers=auth(who))).json()["result"]
            return result

        assert (await listed(inproc.url + "/a2a/jsonrpc", "viewer", pageSize=100))["totalSize"] == 300
        assert (await listed(inproc.url + "/a2a/jsonrpc", "dev-1", pageSize=100))["totalSize"] == 100
        assert (await listed(inproc.url + "/a2a/agents/echo/jsonrpc", "viewer"))["totalSize"] == 0
