"""Open-loop load: send at a fixed rate and measure latency from the *intended* send time.

A closed loop (send, wait, send) hides queueing delay (coordinated omission).
Here message ``i`` is due at ``start + i / rate``; its latency is measured
from that due time to when the consumer saw it, so a stall shows up in the
percentiles of every message that should have gone out during it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def drive(
    rate: float, count: int, send: Callable[[int, float], Awaitable[None]], *, max_in_flight: int = 10_000
) -> float:
    """Call ``send(i, due)`` for i in range(count) at ``rate`` per second; returns seconds taken.

    ``due`` is the ``time.perf_counter()`` value message i was scheduled for;
    the receiver computes latency as ``perf_counter() - due``. Sends run as
    concurrent tasks (up to ``max_in_flight``) so one slow send does not
    delay the schedule of the next. The first send that fails stops the
    schedule and is raised once the sends in flight have ended: a benchmark
    must not wait for a message that never went out.
    """
    interval = 1.0 / rate
    start = time.perf_counter()
    limiter = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task[None]] = set()
    failures: list[BaseException] = []

    async def one(i: int, due: float) -> None:
        try:
            await send(i, due)
        except Exception as exc:
            failures.append(exc)
        finally:
            limiter.release()

    for i in range(count):
        if failures:
            break
        due = start + i * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await limiter.acquire()
        task = asyncio.create_task(one(i, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    if failures:
        raise failures[0]
    return time.perf_counter() - start
