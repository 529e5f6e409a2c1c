"""The history store: every message kept once, with a per-execution sequence number.

``open_store(url)`` picks the engine by URL: SQLite (embedded default) or PostgreSQL.
"""

from squadbus.store._common import position_cursor
from squadbus.store.base import (
    AgentPage,
    AgentQuery,
    AgentSummary,
    ClaimsIdGroups,
    ClaimsIds,
    ExecutionPage,
    ExecutionQuery,
    ExecutionSnapshot,
    ExecutionSummary,
    HistoryPage,
    HistoryQuery,
    HistoryStore,
    IdClaim,
    InvalidQuery,
    ListsExecutions,
    StoredMessage,
    open_store,
)

__all__ = [
    "AgentPage",
    "AgentQuery",
    "AgentSummary",
    "ClaimsIdGroups",
    "ClaimsIds",
    "ExecutionPage",
    "ExecutionQuery",
    "ExecutionSnapshot",
    "ExecutionSummary",
    "HistoryPage",
    "HistoryQuery",
    "HistoryStore",
    "IdClaim",
    "InvalidQuery",
    "ListsExecutions",
    "StoredMessage",
    "open_store",
    "position_cursor",
]
