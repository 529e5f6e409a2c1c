"""The history store: every message kept once, with a per-execution sequence number.

``open_store(url)`` picks the engine by URL: SQLite (embedded default) or PostgreSQL.
"""

from squadbus.store._common import position_cursor
from squadbus.store.base import (
    ClaimsIdGroups,
    ClaimsIds,
    ExecutionSnapshot,
    HistoryPage,
    HistoryQuery,
    HistoryStore,
    IdClaim,
    InvalidQuery,
    StoredMessage,
    open_store,
)

__all__ = [
    "ClaimsIdGroups",
    "ClaimsIds",
    "ExecutionSnapshot",
    "HistoryPage",
    "HistoryQuery",
    "HistoryStore",
    "IdClaim",
    "InvalidQuery",
    "StoredMessage",
    "open_store",
    "position_cursor",
]
