"""ListTasks: cursor pages of the caller's tasks, walked through the store's execution index.

A page walks the store's execution listing (``list_executions``: executions
by last activity, newest first, on the ``exec_counters`` activity index,
filtered to those with an opening ``a2a.task`` message and, for an agent
token or an agent's interface, to those the agent took part in), and folds
only the tasks it shows (plus those a filter drops on the way). The page
token carries the store's cursor, so the next page continues where this one
stopped: following the tokens visits each task once (a task updated meanwhile
moves to the front; a reader already past it does not see it again), with no
duplicates and no gaps.

Order: last activity of the execution (any stored message, push configs
included), which is the task's status time but for messages that change no
state. ``totalSize`` is counted once, on the first page, from the opening
messages in the caller's scope (and ``contextId``), and carried in the token;
it does not apply ``status`` or ``statusTimestampAfter``, which need each task
folded. ``statusTimestampAfter`` also bounds the walk (executions last active
before it are not read).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC

from a2a.types import ListTasksRequest, ListTasksResponse
from a2a.utils.errors import InvalidParamsError, UnsupportedOperationError

from squadbus.service.a2a.mapping import OPEN_TYPE, Entry, TaskView, a2a_meta
from squadbus.service.a2a.tasks import fold, in_scope, rows_of
from squadbus.service.auth import Principal, Role
from squadbus.service.state import Service
from squadbus.store.base import ExecutionQuery, HistoryQuery, InvalidQuery, ListsExecutions, StoredMessage

DEFAULT_PAGE_SIZE = 50
COUNT_PAGE = 1000


@dataclass(frozen=True, slots=True)
class PageToken:
    """Where the next page starts (the store's cursor) and the total counted on the first page."""

    cursor: str
    total: int

    def encode(self) -> str:
        """The opaque ``nextPageToken``."""
        raw = json.dumps({"c": self.cursor, "n": self.total}, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> PageToken:
        """A token of :meth:`encode`; InvalidParamsError for anything else."""
        try:
            raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            return cls(cursor=str(raw["c"]), total=int(raw["n"]))
        except (ValueError, TypeError, KeyError, binascii.Error):
            raise InvalidParamsError("pageToken is not a nextPageToken of ListTasks") from None


def _opened_in_scope(row: StoredMessage, who: Principal, agent_id: str | None, context_id: str) -> bool:
    """Does this opening message open a task the caller lists (scope, agent interface, ``contextId``)?"""
    m = row.message
    if m.task_execution_id is None or (agent_id is not None and m.recipient_id != agent_id):
        return False
    if who.role is Role.AGENT and who.agent_id not in (m.sender_id, m.recipient_id):
        return False
    if context_id:
        found = a2a_meta(Entry.of_row(row)).get("context_id") or str(m.task_execution_id)
        return bool(found == context_id)
    return True


async def _count(service: Service, who: Principal, agent_id: str | None, scope: str | None, context_id: str) -> int:
    """The tasks in scope: one read of their opening messages (pages of :data:`COUNT_PAGE`)."""
    total = 0
    cursor: str | None = None
    while True:
        page = await service.store.query(HistoryQuery(message_type=OPEN_TYPE, agent_id=scope, cursor=cursor,
                                                      limit=COUNT_PAGE))
        total += sum(1 for row in page.items if _opened_in_scope(row, who, agent_id, context_id))
        if page.next_cursor is None:
            return total
        cursor = page.next_cursor


def _shown(view: TaskView, req: ListTasksRequest, who: Principal, agent_id: str | None) -> bool:
    if not view.opened or not in_scope(view, who) or view.updated_at is None:
        return False
    if agent_id is not None and view.agent_id != agent_id:
        return False
    if req.context_id and view.context_id != req.context_id:
        return False
    if req.status and view.state != req.status:
        return False
    return not (req.HasField("status_timestamp_after")
                and view.updated_at <= req.status_timestamp_after.ToDatetime(UTC))


async def list_tasks(service: Service, req: ListTasksRequest, who: Principal, agent_id: str | None
                     ) -> ListTasksResponse:
    """One page of the caller's tasks (``agent_id``'s when given), most recently active first."""
    store = service.store
    if not isinstance(store, ListsExecutions):
        raise UnsupportedOperationError("this history store cannot list executions")
    page_size = req.page_size if req.HasField("page_size") else DEFAULT_PAGE_SIZE
    history = req.history_length if req.HasField("history_length") else 0
    scope = who.agent_id if who.role is Role.AGENT else agent_id
    since = req.status_timestamp_after.ToDatetime(UTC) if req.HasField("status_timestamp_after") else None
    token = PageToken.decode(req.page_token) if req.page_token else None
    total = token.total if token is not None else await _count(service, who, agent_id, scope, req.context_id)
    cursor = token.cursor if token is not None else None
    views: list[TaskView] = []
    while len(views) < page_size:
        # ask for exactly what is missing: every execution of a store page is consumed, so the store's
        # cursor is where the next ListTasks page starts
        try:
            page = await store.list_executions(ExecutionQuery(agent_id=scope, message_type=OPEN_TYPE, since=since,
                                                              cursor=cursor, limit=page_size - len(views)))
        except InvalidQuery:
            raise InvalidParamsError("pageToken is not a nextPageToken of ListTasks") from None
        for item in page.items:
            view = fold(item.task_execution_id, await rows_of(service, item.task_execution_id))
            if _shown(view, req, who, agent_id):
                views.append(view)
        cursor = page.next_cursor
        if cursor is None:
            break
    tasks = []
    for view in views:
        task = view.task(history)
        if not req.include_artifacts:
            task.ClearField("artifacts")
        tasks.append(task)
    next_token = PageToken(cursor, total).encode() if cursor is not None else ""
    return ListTasksResponse(tasks=tasks, next_page_token=next_token, page_size=page_size, total_size=total)
