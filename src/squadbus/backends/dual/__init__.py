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

**The secondary's policy** is a third ``|`` part of the URL:
``dual://<primary>|<secondary>|secondary=spool&spool=/var/lib/squadbus/spool.db``.

* ``secondary=fail`` (the default): as above, a publish raises when the
  secondary did not store it, so an outage of the new system stops producers.
* ``secondary=spool``: the primary's acknowledgement decides success. What the
  secondary did not take is appended to a local durable spool
  (:mod:`squadbus.backends.dual.spool`; ``spool=`` its file, default
  ``dual-spool-<digest of the secondary URL>.db`` in ``SQUADBUS_DATA_DIR``) and
  sent to it in spool order, retried with backoff up to ``retry_max`` seconds
  (default 5) until it lands; while anything is spooled, new messages queue
  behind it, so per-execution order holds on the secondary. A message the
  secondary refuses for good (too large there, say) is set aside in the
  spool's ``refused`` table with the reason, logged, and counted. What is
  spooled survives a restart of the process (the same ``spool=`` resumes
  it). The depth is :meth:`DualBackend.figures` (``/metrics``:
  ``squadbus_backend_dual_spool_depth``). The secondary must be reachable
  when the process starts; outages after that are spooled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from uuid import UUID

from squadbus.backends.dual.spool import Spool, default_path
from squadbus.core.backend import (
    Backend,
    BatchRawHandler,
    BatchSubscriber,
    ConsumerOptions,
    DescribesGroups,
    GroupFigures,
    RawHandler,
    Replayable,
    Subscription,
    publish_all,
)
from squadbus.core.backoff import Backoff, BackoffPolicy
from squadbus.core.batching import gather_batches
from squadbus.core.envelope import Message
from squadbus.core.errors import BackendError, BackendTimeout, ConfigError, InvalidMessage, PublishFailed, SquadbusError
from squadbus.core.registry import open_backend
from squadbus.core.settings import data_dir_from_env
from squadbus.core.tasks import cancel_and_wait

logger = logging.getLogger("squadbus.backends.dual")


def secondary_error(primary: str, secondary: str, exc: SquadbusError, ids: str) -> SquadbusError:
    """The error of a publish the primary stored and the secondary did not confirm, of ``exc``'s kind."""
    if isinstance(exc, BackendTimeout):
        return BackendTimeout(f"stored in {primary}; not confirmed by {secondary} in time (it may be stored "
                              f"there): {exc}; retry with the same {ids}")
    kind = type(exc) if isinstance(exc, BackendError | InvalidMessage) else PublishFailed
    return kind(f"stored in {primary} but not in {secondary}: {exc}; retry with the same {ids}")


class DualBackend:
    """Writes to two backends, reads from the first; see the module docstring for the secondary's policy."""

    def __init__(
        self, primary: Backend, secondary: Backend, *, spool: Spool | None = None, retry_max: float = 5.0
    ) -> None:
        self.primary = primary
        self.secondary = secondary
        self.name = f"dual({primary.name}|{secondary.name})"
        self.secondary_failures = 0
        self.spool = spool
        self.retry_max = retry_max
        self._spooling = False
        self._order = asyncio.Lock()  # held to append to the spool and to decide it is empty
        self._drainer: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        """Connect both (and open the spool); if the secondary fails, the primary is closed again."""
        await self.primary.connect()
        try:
            await self.secondary.connect()
            if self.spool is not None:
                await self.spool.open()
                if self.spool.depth:
                    logger.warning("dual-write: %d messages spooled for %s by an earlier run; sending them first",
                                   self.spool.depth, self.secondary.name)
                    self._spooling = True
                    self._start_drainer()
        except BaseException:
            await self.primary.close()
            await self.secondary.close()
            raise

    async def close(self) -> None:
        """Close both (idempotent); what is still spooled stays on disk for the next start."""
        drainer, self._drainer = self._drainer, None
        try:
            await cancel_and_wait(drainer)
        finally:
            await self._close_both()

    async def _close_both(self) -> None:
        try:
            await self.primary.close()
        finally:
            try:
                await self.secondary.close()
            finally:
                if self.spool is not None:
                    await self.spool.close()

    @property
    def spooling(self) -> bool:
        """True while the secondary's copies go to the spool (from a failure until the spool drained)."""
        return self._spooling

    def figures(self) -> Mapping[str, float]:
        """Gauges for ``/metrics``: the spool's depth and refusals, the secondary's failures."""
        spool = self.spool
        return {
            "dual_secondary_failures": self.secondary_failures,
            "dual_spooling": int(self._spooling),
            "dual_spool_depth": spool.depth if spool is not None else 0,
            "dual_spool_refused": spool.refused if spool is not None else 0,
        }

    async def publish(self, message: Message) -> None:
        """Store in the primary, then the secondary (or its spool)."""
        await self.primary.publish(message)
        await self._to_secondary([message], "id")

    async def publish_many(self, messages: Sequence[Message]) -> None:
        """Store all in the primary, then all in the secondary (or its spool), each with its batch publish."""
        await publish_all(self.primary, messages)
        await self._to_secondary(messages, "ids")

    async def _to_secondary(self, messages: Sequence[Message], ids: str) -> None:
        if not self._spooling:
            try:
                await publish_all(self.secondary, messages)
                return
            except SquadbusError as exc:
                self.secondary_failures += 1
                what = str(messages[0].id) if len(messages) == 1 else f"a batch of {len(messages)}"
                if self.spool is None:
                    logger.warning("dual-write: secondary %s failed for %s: %s", self.secondary.name, what, exc)
                    raise secondary_error(self.primary.name, self.secondary.name, exc, ids) from exc
                logger.warning("dual-write: secondary %s failed for %s (%s); spooling to %s until it answers",
                               self.secondary.name, what, exc, self.spool.path)
        assert self.spool is not None
        async with self._order:
            await self.spool.append(messages)
            self._spooling = True
        self._start_drainer()

    def _start_drainer(self) -> None:
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain(), name="squadbus-dual-spool")

    async def _drain(self) -> None:
        """Send the spool to the secondary, oldest first, until it is empty; then publish directly again."""
        spool = self.spool
        assert spool is not None
        backoff = Backoff(BackoffPolicy(min(0.1, self.retry_max), self.retry_max))  # 0.1 s first, unless capped lower
        started, sent = time.monotonic(), 0
        while True:
            batch = await spool.head(500)
            if not batch:
                async with self._order:  # no append is in flight while this is held
                    if spool.depth == 0:
                        self._spooling = False
                        logger.warning("dual-write: spool drained: %d messages sent to %s in %.1f s",
                                       sent, self.secondary.name, time.monotonic() - started)
                        return
                continue
            try:
                await publish_all(self.secondary, [m for _, m in batch])
            except InvalidMessage:
                # Refused for good somewhere in the batch: send one at a time to find it.
                if not await self._send_one_by_one(batch):
                    await backoff.sleep()
                continue
            except SquadbusError as exc:
                self.secondary_failures += 1
                delay = backoff.next()
                logger.info("dual-write: secondary %s still failing (%s); %d spooled, next try in %.1f s",
                            self.secondary.name, exc, spool.depth, delay)
                await asyncio.sleep(delay)
                continue
            await spool.remove_through(batch[-1][0])
            sent += len(batch)
            backoff.reset()

    async def _send_one_by_one(self, batch: Sequence[tuple[int, Message]]) -> bool:
        """True if the whole batch was settled (sent or refused); False on a passing error."""
        spool = self.spool
        assert spool is not None
        for seq, message in batch:
            try:
                await self.secondary.publish(message)
            except InvalidMessage as exc:
                logger.error("dual-write: secondary %s refuses %s for good (%s); set aside in %s (refused)",
                             self.secondary.name, message.id, exc, spool.path)
                await spool.refuse(seq, str(exc))
                continue
            except SquadbusError:
                return False
            await spool.remove_through(seq)
        return True

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

    async def group_figures(self) -> Sequence[GroupFigures]:
        """The primary's consumer groups (DescribesGroups; consumers read from the primary), or none
        when the primary cannot describe them."""
        if not isinstance(self.primary, DescribesGroups):
            return ()
        return await self.primary.group_figures()


def from_url(url: str) -> DualBackend:
    """``dual://<primary-url>|<secondary-url>[|secondary=fail|spool&spool=PATH&retry_max=S]``."""
    rest = url.split("://", 1)[1] if "://" in url else ""
    primary, sep, tail = rest.partition("|")
    secondary, _, option_text = tail.partition("|")
    if not sep or not primary or not secondary:
        raise ConfigError(f"expected dual://<primary-url>|<secondary-url>, got {url!r}")
    if primary.startswith("dual:") or secondary.startswith("dual:"):
        raise ConfigError("dual:// cannot nest")
    options = dict(urllib.parse.parse_qsl(option_text, keep_blank_values=True))
    unknown = set(options) - {"secondary", "spool", "retry_max"}
    if unknown:
        raise ConfigError(f"unknown dual:// option(s) {', '.join(sorted(unknown))} "
                          "(known: secondary=fail|spool, spool=PATH, retry_max=SECONDS)")
    policy = options.get("secondary", "fail")
    if policy not in ("fail", "spool"):
        raise ConfigError(f"dual:// secondary={policy!r}: expected fail or spool")
    try:
        retry_max = float(options.get("retry_max", "5"))
    except ValueError:
        raise ConfigError(f"dual:// retry_max={options['retry_max']!r} is not a number of seconds") from None
    if not retry_max > 0:
        raise ConfigError("dual:// retry_max must be > 0")
    spool = None
    if policy == "spool":
        spool = Spool(options.get("spool") or default_path(data_dir_from_env(), secondary))
    elif "spool" in options:
        raise ConfigError("dual:// spool= needs secondary=spool")
    return DualBackend(open_backend(primary), open_backend(secondary), spool=spool, retry_max=retry_max)
