"""Consumer-group workers: db-writer, sse-broadcaster, analytics, audit-logger.

Each is a :class:`~squadbus.workers.base.Worker` (``name``, ``start()``,
``stop()``) built by :func:`squadbus.workers.registry.build_worker`, so
``squadbus serve`` runs them in-process and ``squadbus worker NAME`` alone.
"""

from squadbus.workers.base import Worker

__all__ = ["Worker"]
