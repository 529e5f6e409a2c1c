"""Worker names to factories: ``build_worker(name, bus, store, settings)``.

To add a worker, add one ``name: factory`` entry to :data:`FACTORIES`; a
factory takes ``(bus, store, settings)`` and returns a not-yet-started Worker.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from squadbus.core.bus import Bus
from squadbus.core.errors import ConfigError
from squadbus.core.settings import Settings
from squadbus.store.base import HistoryStore
from squadbus.workers.base import Worker

WorkerFactory = Callable[[Bus, HistoryStore, Settings], Worker]


def _db_writer(bus: Bus, store: HistoryStore, settings: Settings) -> Worker:
    from squadbus.workers.db_writer import DbWriter

    return DbWriter(bus, store)


def _analytics(bus: Bus, store: HistoryStore, settings: Settings) -> Worker:
    from squadbus.workers.analytics import Analytics

    return Analytics(bus)


def _audit_logger(bus: Bus, store: HistoryStore, settings: Settings) -> Worker:
    from squadbus.workers.audit import AuditLogger

    return AuditLogger(bus, path=settings.audit_path)


def _sse_broadcaster(bus: Bus, store: HistoryStore, settings: Settings) -> Worker:
    from squadbus.workers.sse_broadcaster import SseBroadcaster

    return SseBroadcaster(bus)


def _dead_letter_keeper(bus: Bus, store: HistoryStore, settings: Settings) -> Worker:
    from squadbus.workers.dead_letters import DeadLetterKeeper

    return DeadLetterKeeper(bus, store)


FACTORIES: Mapping[str, WorkerFactory] = {
    "db-writer": _db_writer,
    "dead-letter-keeper": _dead_letter_keeper,
    "analytics": _analytics,
    "audit-logger": _audit_logger,
    "sse-broadcaster": _sse_broadcaster,
}


def worker_names() -> list[str]:
    """The names :func:`build_worker` accepts, sorted."""
    return sorted(FACTORIES)


def build_worker(name: str, bus: Bus, store: HistoryStore, settings: Settings) -> Worker:
    """A new (not started) worker called ``name``; raises ConfigError for an unknown name."""
    factory = FACTORIES.get(name)
    if factory is None:
        raise ConfigError(f"unknown worker {name!r}: expected one of {', '.join(worker_names())}")
    return factory(bus, store, settings)
