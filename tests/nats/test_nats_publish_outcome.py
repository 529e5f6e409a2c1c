"""What a failed publish tells the caller: "not stored" only when no attempt may have been stored.

The retry loop's decision is driven here by a stand-in for nats-py's JetStream context, because the
sequence that matters (an attempt with no PubAck, then "no responders" while a new stream leader is
elected) cannot be produced on demand by one server; the real case is
tests/faults/test_faults_system.py::test_nats_cluster_stream_leader_kill9_and_restart, where 4 sends
were told PublishFailed and were delivered.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
import pytest

from squadbus.backends.nats.publisher import NatsPublisher
from squadbus.backends.nats.settings import NatsSettings
from squadbus.core import envelope
from squadbus.core.errors import BackendTimeout, PublishFailed


class _Stream:
    """Each publish gets the next outcome (the last repeats): 'silent' never answers, 'none' is
    "no responders" (no stream leader)."""

    def __init__(self, *outcomes: str) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    def publish_async_pending(self) -> int:
        return 0

    async def publish_async(self, subject: str, data: bytes, **_: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        outcome = self.outcomes[min(self.calls, len(self.outcomes) - 1)]
        self.calls += 1
        if outcome == "none":
            future.set_exception(nats.errors.NoRespondersError())
        return future


def _publisher(stream: _Stream) -> NatsPublisher:
    settings = NatsSettings(ack_timeout=0.1, publish_timeout=0.6)
    return NatsPublisher(None, stream, settings)  # type: ignore[arg-type]


async def test_no_puback_then_no_leader_is_may_be_stored_not_failed() -> None:
    stream = _Stream("silent", "none")
    message = envelope.build(subject="agent.message.dev-1", sender_id="pm", content="hi")
    with pytest.raises(BackendTimeout, match="may be stored; retry with the same id"):
        await _publisher(stream).publish(message)
    assert stream.calls >= 2


async def test_no_leader_on_every_attempt_is_not_stored() -> None:
    stream = _Stream("none")
    message = envelope.build(subject="agent.message.dev-1", sender_id="pm", content="hi")
    with pytest.raises(PublishFailed, match="no JetStream stream answered"):
        await _publisher(stream).publish(message)
    assert stream.calls >= 2
