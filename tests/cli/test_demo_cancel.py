"""``squadbus demo`` ends its agents with core.tasks.cancel_and_wait: an agent that failed on its own is reported
(its exception raised), not swallowed with the cancellations of the others."""

from __future__ import annotations

from typing import Any

import pytest

from squadbus.cli.demo import run_demo
from squadbus.core.bus import Bus


class _AgentFailed(RuntimeError):
    pass


async def test_an_agent_that_failed_is_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    real_reply = Bus.reply
    replies: list[object] = []

    async def reply_then_fail(self: Bus, *args: Any, **kwargs: Any) -> Any:
        # the reviewer answers both developers, so the squad still finishes, then fails
        result = await real_reply(self, *args, **kwargs)
        replies.append(result)
        if len(replies) == 2:
            raise _AgentFailed("the reviewer failed after its last reply")
        return result

    monkeypatch.setattr(Bus, "reply", reply_then_fail)
    with pytest.raises(_AgentFailed):
        await run_demo("memory://")
    assert len(replies) == 2
