"""Delays between retries: exponential, capped, jittered; and the named policies squadbus uses.

Every loop that retries after a failure (a reader whose connection broke, a publish
retried within its deadline, a file another process holds) takes its delays from one
:class:`Backoff`, built from a :class:`BackoffPolicy` named here, so the constants live
in one module instead of drifting from loop to loop::

    backoff = Backoff(RECONNECT)
    while not closed:
        try:
            await read()
        except FAILURES:
            await backoff.sleep()
            continue
        backoff.reset()

The n-th delay (n = 0, 1, …) is ``d = min(maximum, initial * factor**n)`` shortened by a
random fraction of up to ``jitter`` of it: with the default ``jitter=0.5`` it lies in
``(d/2, d]`` ("equal jitter"; ``jitter=1`` is "full jitter", ``0`` none). So no delay is
longer than the un-jittered one or than ``maximum``, and clients that lost one broker at
the same moment do not retry in lockstep when it comes back: in bench/bench_reconnect.py
20 Redis clients read again spread over 14-20 10 ms slots after a restart, 1-4 without
jitter. One client may wait longer after a given outage than without jitter (its schedule
is further along), shorter after another; averaged over outage lengths the wait is about
the same or shorter (``bench_reconnect.py --model``, RECONNECT: 0.67 s vs 0.65 s after
0.5-3 s outages, 0.78 s vs 1.04 s after 3-10 s ones; the real runs agree within their noise).

Why not a library (tenacity, backoff, stamina): they retry a *call* (a decorator or an
iterator of attempts that ends on success or when attempts run out). Most of these loops
never end: they run for the life of a connection, sleep after a failure, start over after
a success and stop when closed, and several check the next delay against a deadline
before sleeping, or hand it to ``call_later`` or ``wait_for(stop.wait(), delay)``. What
they need from a library is the arithmetic alone (tenacity's ``wait_exponential_jitter``
object would do): twenty lines, not worth a dependency of the core package (whose only
dependencies are msgspec and click).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from squadbus.core.errors import ConfigError

__all__ = ["CONSUMER_CHECK", "FILE_LOCKED", "NOT_READY", "RECONNECT", "STORE_POLL", "STREAM_NOT_READY",
           "WRITE_RETRY", "Backoff", "BackoffPolicy"]


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """How delays grow: ``initial`` seconds, times ``factor`` per failure, at most ``maximum``;
    each shortened by a random fraction of up to ``jitter`` (0 ≤ jitter ≤ 1) of itself."""

    initial: float
    maximum: float
    factor: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ConfigError(f"backoff needs 0 < initial <= maximum, got {self.initial} and {self.maximum}")
        if self.factor < 1:
            raise ConfigError(f"backoff factor must be >= 1, got {self.factor}")
        if not 0 <= self.jitter <= 1:
            raise ConfigError(f"backoff jitter must be between 0 and 1, got {self.jitter}")

    def delay(self, failures: int, draw: float) -> float:
        """The delay after ``failures`` earlier failures (0 for the first) for a random ``draw`` in [0, 1)."""
        # Compared in logs: after a long outage initial * factor**failures overflows a float.
        if failures * math.log(self.factor) >= math.log(self.maximum / self.initial):
            step = self.maximum
        else:
            step = min(self.initial * self.factor**failures, self.maximum)
        return step * (1.0 - self.jitter * draw)


class Backoff:
    """The delays of one retry loop under ``policy``: :meth:`next` gives the next one (each
    longer than the last, up to the cap), :meth:`reset` starts over after a success.

    ``rand`` returns a float in [0, 1) (``random.random`` unless a test injects its own).
    Not shared between tasks: each loop owns its instance.
    """

    __slots__ = ("_rand", "_step", "failures", "policy")

    def __init__(self, policy: BackoffPolicy, *, rand: Callable[[], float] = random.random) -> None:
        self.policy = policy
        self.failures = 0  # delays handed out since the last reset
        self._step = policy.initial
        self._rand = rand

    def next(self) -> float:
        """The delay before the next retry, in seconds; the one after it grows (up to the cap)."""
        policy = self.policy
        step = self._step
        self._step = min(step * policy.factor, policy.maximum)
        self.failures += 1
        return step * (1.0 - policy.jitter * self._rand())

    def reset(self) -> None:
        """Start over at ``initial`` (call it after a success)."""
        self.failures = 0
        self._step = self.policy.initial

    async def sleep(self) -> float:
        """Sleep for :meth:`next` seconds; returns how long."""
        delay = self.next()
        await asyncio.sleep(delay)
        return delay


# The policies, by what is being retried. Changing one changes how fast those loops recover.

RECONNECT = BackoffPolicy(0.05, 2.0)
"""A long-running reader or writer whose connection broke (Redis reads, acks, bells)."""

WRITE_RETRY = BackoffPolicy(0.05, 1.0)
"""A write retried until it lands or its deadline passes (Redis and NATS publishes)."""

NOT_READY = BackoffPolicy(0.05, 0.5)
"""A NATS consumer that answers 503 until its group has a leader (replay, within a deadline)."""

STREAM_NOT_READY = BackoffPolicy(0.1, 1.0)
"""A NATS stream created or checked while the cluster elects its meta leader (within a deadline)."""

CONSUMER_CHECK = BackoffPolicy(0.2, 2.0)
"""Checking (and recreating) a NATS consumer the server may have lost."""

FILE_LOCKED = BackoffPolicy(0.005, 0.1)
"""A SQLite file another connection holds (within ``busy_timeout``)."""

STORE_POLL = BackoffPolicy(0.01, 1.0)
"""Reading the store again until a published message becomes visible (the SSE hub)."""
