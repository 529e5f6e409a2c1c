"""The inbox benchmarks' steady state ends its agent tasks with core.tasks.cancel_and_wait: an agent whose inbox
failed on its own is reported (its exception raised), not swallowed with the others' cancellations and its
figures returned as if every agent had run."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from typing import cast

import pytest

from squadbus.benchmarks.inboxes import steady_state
from squadbus.core.bus import Bus
from squadbus.core.errors import ConnectionLost
from squadbus.core.inbox import Inbox


class _LostInbox:
    """An inbox whose connection is lost as soon as its agent reads it."""

    def __aiter__(self) -> _LostInbox:
        return self

    async def __anext__(self) -> object:
        raise ConnectionLost("the inbox's connection was lost")


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """steady_state freezes the collector as a host runner does; this test session must go on collecting."""
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("unfrozen")
async def test_an_agent_whose_inbox_failed_is_not_swallowed() -> None:
    async with Bus.from_url("memory://") as bus:
        inboxes = [cast(Inbox, _LostInbox())]
        with pytest.raises(ConnectionLost):
            # rate x seconds = 0 messages: what is measured is only how the agents end
            await steady_state(bus, inboxes, ["a0"], 1.0, 0.0, server_pid=os.getpid(), server_cpu_key="cpu")
