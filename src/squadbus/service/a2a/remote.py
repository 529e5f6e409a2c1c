"""Remote A2A agents as squad members: :func:`join` makes a remote A2A agent answer as ``agent_id`` on the bus.

:class:`RemoteMember` is the consumer group ``a2a-join-<agent_id>`` on the
agent's direct subject: every message to ``agent_id`` is sent to the remote
agent with the a2a-sdk client (streaming when its card says so), and what it
answers comes back on the bus as ``agent_id``'s messages to the sender, in the
same execution, so the history keeps them:

* status updates become messages whose ``message_type`` is the state's
  (``working``, ``input-required``, ``auth-required``, ``failed``,
  ``rejected``, ``canceled``; ``completed`` is a ``reply``), content the
  status message's text; artifacts become ``artifact`` messages; a direct
  Message answer is a ``reply``. The final ``reply`` carries the status
  message's text, else the last artifact's;
* a message sent with :meth:`~squadbus.core.bus.Bus.request` gets its final
  answer on its ``reply_to`` subject, so ``bus.request("pm", "weather", ...)``
  works with a remote agent;
* an answer's id is ``uuid5(request id, n)``: a retried request republishes
  the same ids, which the store (and backends that dedupe) keep once;
* while the remote task waits for input, the next message of the same
  execution continues it (``taskId``); ``a2a.cancel`` cancels it;
* the remote A2A ``messageId`` is the squadbus message id and its
  ``contextId`` the execution id.

A remote agent that is down (connection refused, timeout, HTTP error, an A2A
error) fails the delivery: it is retried with backoff and dead-lettered on
``agent.dlq.a2a-join-<agent_id>`` after ``attempts``, never dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from uuid import UUID, uuid5

import httpx
from a2a.client import A2AClientError, Client, ClientConfig, ClientFactory
from a2a.types import (
    CancelTaskRequest,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    TaskState,
)
from a2a.types import Message as A2AMessage
from a2a.utils.errors import A2AError

from squadbus.core import envelope, subjects
from squadbus.core.backend import ConsumerOptions, Delivery, Subscription
from squadbus.core.bus import CORRELATION_ID, REPLY_TO, Bus
from squadbus.core.envelope import Message
from squadbus.core.errors import Nack
from squadbus.service.a2a.mapping import CANCEL_TYPE, CONTROL_TYPES
from squadbus.service.a2a.registry import REGISTER_TYPE

logger = logging.getLogger("squadbus.service.a2a.remote")

TYPE_BY_STATE: Mapping[int, str] = {
    TaskState.TASK_STATE_WORKING: "working",
    TaskState.TASK_STATE_COMPLETED: "reply",
    TaskState.TASK_STATE_INPUT_REQUIRED: "input-required",
    TaskState.TASK_STATE_AUTH_REQUIRED: "auth-required",
    TaskState.TASK_STATE_FAILED: "failed",
    TaskState.TASK_STATE_REJECTED: "rejected",
    TaskState.TASK_STATE_CANCELED: "canceled",
}
"""The squadbus ``message_type`` of each remote task state (the inverse of :data:`.mapping.STATE_BY_TYPE`)."""
FINAL = frozenset({TaskState.TASK_STATE_COMPLETED, TaskState.TASK_STATE_FAILED, TaskState.TASK_STATE_REJECTED,
                   TaskState.TASK_STATE_CANCELED})
SKIPPED = frozenset({REGISTER_TYPE, *CONTROL_TYPES})


def _text(parts: Any) -> str:
    return "\n".join(p.text for p in parts if p.WhichOneof("content") == "text")


class RemoteMember:
    """A remote A2A agent at ``url`` answering as ``agent_id`` on ``bus`` (see the module docstring).

    ``headers`` go with every request to the remote agent (e.g. its bearer
    token). ``attempts``, ``backoff_base`` and ``backoff_max``: the retry
    policy while it is down. ``timeout``: seconds per HTTP request.
    """

    def __init__(self, bus: Bus, agent_id: str, url: str, *, headers: Mapping[str, str] | None = None,
                 attempts: int = 5, backoff_base: float = 1.0, backoff_max: float = 60.0,
                 timeout: float = 60.0) -> None:
        subjects.validate_token(agent_id, what="agent_id")
        self.bus = bus
        self.agent_id = agent_id
        self.url = url.rstrip("/")
        self.group = f"a2a-join-{agent_id}"
        self.options = ConsumerOptions(max_deliver=attempts, backoff_base=backoff_base, backoff_max=backoff_max,
                                       ack_wait=max(30.0, timeout * 2))
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.sent = 0
        self.failures = 0
        self._tasks: dict[UUID, str] = {}  # execution -> remote task waiting for input
        self._http: httpx.AsyncClient | None = None
        self._client: Client | None = None
        self._sub: Subscription | None = None

    async def start(self) -> None:
        """Join the group (idempotent); the remote card is read on the first message, so it may be down now."""
        if self._sub is not None:
            return
        self._http = httpx.AsyncClient(headers=self.headers, timeout=self.timeout)
        self._sub = await self.bus.subscribe(subjects.direct(self.agent_id), self._handle, group=self.group,
                                             options=self.options)
        logger.info("remote A2A agent %s joined the squad as %s", self.url, self.agent_id)

    async def stop(self) -> None:
        """Leave after the message in flight (idempotent)."""
        sub, self._sub = self._sub, None
        if sub is not None:
            await self.bus.unsubscribe(sub)
        http, self._http, self._client = self._http, None, None
        if http is not None:
            await http.aclose()

    async def __aenter__(self) -> RemoteMember:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _remote(self) -> Client:
        if self._client is None:
            assert self._http is not None, "start() first"
            factory = ClientFactory(ClientConfig(httpx_client=self._http, streaming=True))
            self._client = await factory.create_from_url(self.url)
        return self._client

    async def _handle(self, delivery: Delivery) -> None:
        m = delivery.message
        if m.message_type in SKIPPED or m.sender_id == self.agent_id:
            return
        try:
            if m.message_type == CANCEL_TYPE:
                await self._cancel(m)
            else:
                await self._forward(m)
        except (A2AClientError, A2AError, httpx.HTTPError, OSError, ValueError) as exc:
            self.failures += 1
            self._client = None  # read the card again: the agent may have moved or restarted
            logger.info("remote A2A agent %s (%s) failed on message %s, attempt %d: %s", self.agent_id, self.url,
                        m.id, delivery.attempt, exc)
            raise Nack(f"remote A2A agent {self.url}: {type(exc).__name__}: {exc}") from exc

    async def _cancel(self, m: Message) -> None:
        remote_task = self._tasks.pop(m.task_execution_id, None) if m.task_execution_id else None
        if remote_task is not None:
            await (await self._remote()).cancel_task(CancelTaskRequest(id=remote_task))

    async def _forward(self, m: Message) -> None:
        client = await self._remote()
        execution = m.task_execution_id
        waiting = self._tasks.get(execution) if execution is not None else None
        request = SendMessageRequest(message=A2AMessage(
            message_id=str(m.id), role=Role.ROLE_USER, parts=[Part(text=m.content)],
            context_id=str(execution) if execution is not None else "", task_id=waiting or ""))
        answers = 0
        last_artifact = ""
        async for event in client.send_message(request):
            for message_type, text, meta, state in self._answers(event):
                if message_type == "artifact":
                    last_artifact = text
                content = last_artifact if message_type == "reply" and not text else text
                answers += 1
                await self._publish(m, answers, message_type, content, meta, final=state in FINAL)
                if execution is not None:
                    if state in (TaskState.TASK_STATE_INPUT_REQUIRED, TaskState.TASK_STATE_AUTH_REQUIRED):
                        self._tasks[execution] = str(meta["remote_task_id"])
                    elif state in FINAL:
                        self._tasks.pop(execution, None)
        self.sent += 1

    def _answers(self, event: StreamResponse) -> list[tuple[str, str, dict[str, Any], int | None]]:
        kind = event.WhichOneof("payload")
        if kind == "message":
            msg = event.message
            return [("reply", _text(msg.parts), {"remote_context_id": msg.context_id}, TaskState.TASK_STATE_COMPLETED)]
        if kind == "artifact_update":
            a = event.artifact_update
            return [("artifact", _text(a.artifact.parts), {"remote_task_id": a.task_id, "name": a.artifact.name},
                     None)]
        if kind == "status_update":
            u = event.status_update
            return self._status(u.task_id, u.context_id, u.status.state, _text(u.status.message.parts))
        if kind == "task":  # the first event of a stream, or the whole answer of a non-streaming agent
            t = event.task
            out: list[tuple[str, str, dict[str, Any], int | None]] = [
                ("artifact", _text(a.parts), {"remote_task_id": t.id, "name": a.name}, None) for a in t.artifacts]
            if t.status.state != TaskState.TASK_STATE_SUBMITTED:
                out += self._status(t.id, t.context_id, t.status.state, _text(t.status.message.parts))
            return out
        return []

    @staticmethod
    def _status(task_id: str, context_id: str, state: int, text: str
                ) -> list[tuple[str, str, dict[str, Any], int | None]]:
        message_type = TYPE_BY_STATE.get(state)
        if message_type is None:
            return []
        meta = {"remote_task_id": task_id, "remote_context_id": context_id, "state": TaskState.Name(state)}
        return [(message_type, text, meta, state)]

    async def _publish(self, request: Message, n: int, message_type: str, content: str, meta: dict[str, Any],
                       *, final: bool) -> None:
        reply_to = request.headers.get(REPLY_TO)
        subject = reply_to if final and reply_to else subjects.direct(request.sender_id)
        headers = {CORRELATION_ID: str(request.id)} if final and reply_to else None
        message = envelope.build(
            subject=subject, sender_id=self.agent_id, recipient_id=request.sender_id, content=content,
            message_type=message_type, task_execution_id=request.task_execution_id,
            metadata={"a2a": meta}, headers=headers, id=uuid5(request.id, str(n)),
            max_content_bytes=self.bus.max_content_bytes,
        )
        await self.bus.publish(message)


async def join(bus: Bus, url: str, agent_id: str, **options: Any) -> RemoteMember:
    """Make the remote A2A agent at ``url`` squad member ``agent_id`` (started; ``stop()`` it when done)."""
    member = RemoteMember(bus, agent_id, url, **options)
    await member.start()
    return member
