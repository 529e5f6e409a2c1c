"""The open-loop driver of the benchmarks (``squadbus.benchmarks.openloop``)."""

from __future__ import annotations

import asyncio

import pytest

from squadbus.benchmarks.openloop import drive


async def test_every_message_is_sent_once_at_its_due_time_order() -> None:
    seen: list[int] = []

    async def send(i: int, due: float) -> None:
        await asyncio.sleep(0)
        seen.append(i)

    await drive(10_000, 50, send)
    assert sorted(seen) == list(range(50))


async def test_a_failed_send_is_raised_not_lost() -> None:
    """A send that fails early (e.g. the client's connection pool is exhausted) used to end as
    "Task exception was never retrieved" while the benchmark waited for a message that never went out."""

    async def send(i: int, due: float) -> None:
        if i == 0:
            raise ConnectionError("Too many connections")
        await asyncio.sleep(0)

    with pytest.raises(ConnectionError, match="Too many connections"):
        await asyncio.wait_for(drive(1_000, 20, send), 30)
