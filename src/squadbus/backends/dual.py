"""Dual-write for migrations: ``dual://<primary-url>|<secondary-url>``.

Every publish goes to the primary, then to the secondary; a publish returns
only when both stored the message, and raises if either failed (the caller
retries with the same id; backends that dedupe by id drop the copy). A
secondary failure keeps its kind: a :class:`BackendTimeout` means the
secondary did not confirm in time (the copy may be stored there), a
:class:`PublishFailed` or :class:`ConnectionLost` that it was not stored.

Retrying safely: ``Bus.send`` makes a new id per call, so a retry must pass
the first attempt's id (``bus.send(..., id=message.id)``, or build the message
once and ``bus.publish`` it again); then neither side stores it twice.
Subscriptions and replay read from the primary only. The migration:

1. ``dual://redis://old|nats://new``: write both, consumers still on old;
2. move consumer groups to ``nats://new`` one by one (they start from what
   the new backend retained since step 1);
3. ``nats://new`` alone. Rollback at any step: set the URL back.

``squadbus bridge`` is the alternative when producers cannot be changed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from uuid import UUID

from squadbus.core.backend import (
    Backend,
    BatchRawHandler,
    BatchSubscriber,
    ConsumerOptions,
    RawHandler,
    Replayable,
    Subscription,
    publish_all,
)
from squadbus.core.batching import gather_batches
from squadbus.core.envelope import Message
from squadbus.core.errors import BackendError, BackendTimeout, ConfigError, InvalidMessage, PublishFailed, SquadbusError
from squadbus.core.registry import open_backend

logger = logging.getLogger("squadbus.backends.dual")


def secondary_error(primary: str, secondary: str, exc: SquadbusError, ids: str) -> SquadbusError:
    """The error of a publish the primary stored and the secondary did not confirm, of ``exc``'s kind."""
    if isinstance(exc, BackendTimeout):
        return BackendTimeout(f"stored in {primary}; not confirmed by {secondary} in time (it may be stored "
                              f"there): {exc}; retry with the same {ids}")
    kind = type(exc) if isinstance(exc, BackendError | InvalidMessage) else PublishFailed
    return kind(f"stored in {primary} but not in {secondary}: {exc}; retry with the same {ids}")


class DualBackend:
    """Writes to two backends, reads from the first."""

    def __init__(self, primary: Backend, secondary: Backend) -> None:
        self.primary = primary
        self.secondary = secondary
        self.name = f"dual({primary.name}|{secondary.name})"
        self.secondary_failures = 0

    async def connect(self) -> None:
        """Connect both; if the secondary fails, the primary is closed again."""
        await self.primary.connect()
        try:
            await self.secondary.connect()
        except BaseException:
            await self.primary.close()
            raise

    async def close(self) -> None:
        """Close both (idempotent)."""
        try:
            await self.primary.close()
        finally:
            await self.secondary.close()

    async def publish(self, message: Message) -> None:
        """Store in the primary, then the secondary; raise if either failed."""
        await self.primary.publish(message)
        try:
            await self.secondary.publish(message)
        except SquadbusError as exc:
            self.secondary_failures += 1
            logger.warning("dual-write: secondary %s failed for %s: %s", self.secondary.name, message.id, exc)
            raise secondary_error(self.primary.name, self.secondary.name, exc, "id") from exc

    async def publish_many(self, messages: Sequence[Message]) -> None:
        """Store all in the primary, then all in the secondary, each with its batch publish if it has one."""
        await publish_all(self.primary, messages)
        try:
            await publish_all(self.secondary, messages)
        except SquadbusError as exc:
            self.secondary_failures += 1
            logger.warning("dual-write: secondary %s failed for a batch of %d: %s",
                           self.secondary.name, len(messages), exc)
            raise secondary_error(self.primary.name, self.secondary.name, exc, "ids") from exc

    async def subscribe(
        self, pattern: str, handler: RawHandler, *, group: str | None, options: ConsumerOptions
    ) -> Subscription:
        """Subscribe on the primary."""
        return await self.primary.subscribe(pattern, handler, group=group, options=options)

    async def subscribe_batch(
        self, pattern: str, handler: BatchRawHandler, *, group: str | None, options: ConsumerOptions,
        max_wait: float,
    ) -> Subscription:
        """Batch-subscribe on the primary: natively where it can, else gathered in-process."""
        if isinstance(self.primary, BatchSubscriber):
            return await self.primary.subscribe_batch(pattern, handler, group=group, options=options,
                                                      max_wait=max_wait)
        ahead = dataclasses.replace(options, max_in_flight=options.batch_size * 2)
        return await self.primary.subscribe(
            pattern, gather_batches(handler, options=ahead, max_wait=max_wait), group=group, options=ahead
        )

    async def replay(
        self, task_execution_id: UUID, *, from_seq: int = 0, since: datetime | None = None
    ) -> AsyncIterator[tuple[int, Message]]:
        """Replay from the primary; ConfigError if it cannot."""
        if not isinstance(self.primary, Replayable):
            raise ConfigError(f"primary backend {self.primary.name!r} cannot replay")
        async for item in self.primary.replay(task_execution_id, from_seq=from_seq, since=since):
            yield item


def from_url(url: str) -> DualBackend:
    """``dual://<primary-url>|<secondary-url>``."""
    rest = url.split("://", 1)[1] if "://" in url else ""
    primary, sep, secondary = rest.partition("|")
    if not sep or not primary or not secondary:
        raise ConfigError(f"expected dual://<primary-url>|<secondary-url>, got {url!r}")
    if primary.startswith("dual:") or secondary.startswith("dual:"):
        raise ConfigError("dual:// cannot nest")
    return DualBackend(open_backend(primary), open_backend(secondary))
