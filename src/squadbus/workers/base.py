"""The shape every worker has."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Worker(Protocol):
    """A long-running consumer.

    ``start()`` subscribes and returns once consuming has begun. ``stop()``
    stops taking new deliveries, finishes and settles (acks) the work in
    flight, then returns; it is idempotent and safe before ``start()``.
    """

    name: str

    async def start(self) -> None:
        """Begin consuming."""
        ...

    async def stop(self) -> None:
        """Finish in-flight work and stop (idempotent)."""
        ...
