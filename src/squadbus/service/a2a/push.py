"""Push notifications: every event of a task POSTed to its webhooks by the consumer group ``a2a-push``.

A config (A2A ``TaskPushNotificationConfig``) is a message of the task's
execution, ``a2a.push.set`` (JSON: id, url, token, authentication), undone
by ``a2a.push.delete``; the latest per config id wins. Being history, configs
survive restarts and every replica sees them; their token is readable by
whoever may read the task's history (viewer and admin tokens).

:class:`PushSender` is a member of the consumer group :data:`GROUP` on
``agent.message.>``: for each message of an A2A task that makes a stream event
(:meth:`~.mapping.TaskView.apply`), it POSTs that event (a ``StreamResponse``
as JSON, the HTTP binding's payload, ``metadata["squadbus.seq"]`` included)
to every config of the task, with the config's token in
``X-A2A-Notification-Token`` and its ``authentication`` as the
``Authorization`` header. A webhook that does not answer 2xx fails the
delivery: the group redelivers it with exponential backoff and, after
``push_attempts`` attempts, dead-letters it on ``agent.dlq.a2a-push`` with
the reason, where the dead-letter keeper, ``/metrics``
(``squadbus_dead_letters_total{group="a2a-push"}``) and the dashboard show
it. Delivery is at least once per webhook: a retry POSTs to every config of
the task again, so receivers dedupe by (task id, ``squadbus.seq``). A message
is pushed once it is stored (the event needs its seq): the handler waits
about 2 s for that, then the delivery is retried.

Cost: the group reads every ``agent.message.>`` message once more; a message
of an execution costs a two-row store read, a message of an A2A task a read
of the task's messages, and one with webhooks a POST per webhook.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from uuid import UUID

import httpx
from a2a.types import AuthenticationInfo, TaskPushNotificationConfig

from squadbus.core.backend import ConsumerOptions, Delivery, Subscription
from squadbus.core.bus import Bus
from squadbus.core.errors import Nack
from squadbus.service.a2a.mapping import (
    CLIENT_TYPES,
    CONTROL_TYPES,
    OPEN_TYPE,
    PUSH_DELETE_TYPE,
    PUSH_SET_TYPE,
    Entry,
    TaskView,
    to_json,
)
from squadbus.service.a2a.webhooks import WebhookPolicy, WebhookRefused, post_request
from squadbus.store.base import HistoryStore, StoredMessage

logger = logging.getLogger("squadbus.service.a2a.push")

GROUP = "a2a-push"
PATTERN = "agent.message.>"
TOKEN_HEADER = "X-A2A-Notification-Token"
STORE_WAITS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""Pauses while waiting for a delivered message to be stored (about 2 s in all, then the delivery is nacked)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PushConfig:
    """One webhook of a task."""

    id: str
    url: str
    token: str = ""
    scheme: str = ""
    credentials: str = ""

    def to_json(self) -> str:
        """The content of its ``a2a.push.set`` message."""
        return json.dumps({"id": self.id, "url": self.url, "token": self.token,
                           "authentication": {"scheme": self.scheme, "credentials": self.credentials}})

    @classmethod
    def from_json(cls, content: str) -> PushConfig | None:
        """The config of a stored ``a2a.push.set`` (None if malformed)."""
        try:
            raw = json.loads(content)
            auth = raw.get("authentication") or {}
            return cls(id=str(raw["id"]), url=str(raw["url"]), token=str(raw.get("token") or ""),
                       scheme=str(auth.get("scheme") or ""), credentials=str(auth.get("credentials") or ""))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    @classmethod
    def from_proto(cls, config: TaskPushNotificationConfig, config_id: str) -> PushConfig:
        """From the A2A config a client sent."""
        return cls(id=config_id, url=config.url, token=config.token, scheme=config.authentication.scheme,
                   credentials=config.authentication.credentials)

    def to_proto(self, task_id: UUID) -> TaskPushNotificationConfig:
        """The A2A config."""
        config = TaskPushNotificationConfig(id=self.id, task_id=str(task_id), url=self.url, token=self.token)
        if self.scheme:
            config.authentication.CopyFrom(AuthenticationInfo(scheme=self.scheme, credentials=self.credentials))
        return config

    def headers(self) -> dict[str, str]:
        """The headers of a POST to this webhook."""
        out = {"Content-Type": "application/json"}
        if self.token:
            out[TOKEN_HEADER] = self.token
        if self.scheme:
            out["Authorization"] = f"{self.scheme} {self.credentials}".strip()
        return out


def configs_of(rows: list[StoredMessage]) -> dict[str, PushConfig]:
    """The task's current configs by id (sets and deletes in seq order)."""
    found: dict[str, PushConfig] = {}
    for row in rows:
        m = row.message
        if m.message_type == PUSH_SET_TYPE:
            config = PushConfig.from_json(m.content)
            if config is not None:
                found[config.id] = config
        elif m.message_type == PUSH_DELETE_TYPE:
            try:
                found.pop(str(json.loads(m.content)["id"]), None)
            except (ValueError, KeyError, TypeError):
                continue
    return found


async def stored_rows(store: HistoryStore, task_id: UUID) -> list[StoredMessage]:
    """Every stored message of the execution, by seq."""
    rows: list[StoredMessage] = []
    after = 0
    while True:
        page = await store.after(task_id, after, 1000)
        if not page:
            return rows
        rows.extend(page)
        after = page[-1].seq


class PushSender:
    """The ``a2a-push`` consumer group member of one service (see the module docstring)."""

    name = GROUP

    def __init__(self, bus: Bus, store: HistoryStore, *, attempts: int = 5, backoff_base: float = 1.0,
                 backoff_max: float = 60.0, timeout: float = 10.0, webhooks: WebhookPolicy | None = None) -> None:
        self.bus = bus
        self.store = store
        self.webhooks = webhooks if webhooks is not None else WebhookPolicy()
        self.options = ConsumerOptions(max_deliver=attempts, backoff_base=backoff_base, backoff_max=backoff_max)
        self.timeout = timeout
        self.posted = 0
        self.failed = 0
        self._sub: Subscription | None = None
        self._http: httpx.AsyncClient | None = None

    async def start(self) -> None:
        """Join group ``a2a-push`` (idempotent)."""
        if self._sub is not None:
            return
        self._http = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        self._sub = await self.bus.subscribe(PATTERN, self._handle, group=GROUP, options=self.options)
        logger.info("A2A push notifications: joined consumer group %s", GROUP)

    async def stop(self) -> None:
        """Leave the group after the delivery in flight (idempotent)."""
        sub, self._sub = self._sub, None
        if sub is not None:
            await self.bus.unsubscribe(sub)
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    async def _handle(self, delivery: Delivery) -> None:
        m = delivery.message
        task_id = m.task_execution_id
        if task_id is None or m.message_type in CLIENT_TYPES or m.message_type in CONTROL_TYPES:
            return
        # an A2A task starts with its opening message (after a config sent with it): a two-row read tells
        # any other execution apart, the only cost this group adds to a squad's other messages
        head = await self.store.after(task_id, 0, 2)
        for delay in STORE_WAITS:  # published before stored: the db-writer (or the HTTP write) stores it soon
            if head:
                break
            await asyncio.sleep(delay)
            head = await self.store.after(task_id, 0, 2)
        if not head:
            raise Nack(f"execution {task_id} is not stored yet")
        if not any(row.message.message_type in (OPEN_TYPE, PUSH_SET_TYPE) for row in head):
            return
        rows = await stored_rows(self.store, task_id)
        if not configs_of(rows):
            return  # an A2A task without webhooks
        for delay in STORE_WAITS:
            if any(row.message.id == m.id for row in rows):
                break
            await asyncio.sleep(delay)
            rows = await stored_rows(self.store, task_id)
        view = TaskView(task_id)
        event = None
        for row in rows:
            made = view.apply(Entry.of_row(row))
            if row.message.id == m.id:
                event = made
                break
        else:
            raise Nack(f"message {m.id} is not stored yet")
        configs = configs_of(rows)
        if event is None or not view.opened or not configs:
            return
        body = json.dumps(to_json(event)).encode()
        failures: list[str] = []
        for config in configs.values():
            failure = await self._post(config, body)
            if failure is None:
                self.posted += 1
            else:
                failures.append(f"{config.url}: {failure}")
        if failures:
            self.failed += 1
            logger.info("push of task %s seq %d failed (attempt %d): %s", task_id, view.last_seq,
                        delivery.attempt, "; ".join(failures))
            raise Nack("webhook failed: " + "; ".join(failures))

    async def _post(self, config: PushConfig, body: bytes) -> str | None:
        """POST ``body`` to the webhook's checked address (see :mod:`.webhooks`); why it failed, or None."""
        assert self._http is not None
        try:
            target = await self.webhooks.resolve(config.url)
        except WebhookRefused as exc:
            return f"refused: {exc}"
        try:
            response = await self._http.send(post_request(self._http, target, body, config.headers()))
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__} {exc}"
        if response.is_success:
            return None
        if response.is_redirect:
            return f"HTTP {response.status_code} (redirects are not followed)"
        return f"HTTP {response.status_code}"
