"""NatsBackend.read_all (ReadsAll) beyond the conformance case: its temporary consumer is gone after
a full read and after an early close, and records that are not envelopes are reported, not yielded."""

from __future__ import annotations

import contextlib
import uuid

import pytest

from squadbus.backends.nats import NatsBackend, NatsSettings
from squadbus.core import envelope, subjects

pytestmark = pytest.mark.nats


async def _readers(backend: NatsBackend) -> list[str]:
    """The read-all consumers on the stream (the list comes in pages of 256; the session stream has more)."""
    names: list[str] = []
    offset = 0
    while True:
        page = await backend.js.consumers_info(backend.settings.stream, offset=offset)
        names += [c.name for c in page if c.name and c.name.startswith("read-all-")]
        if len(page) < 256:
            return names
        offset += len(page)


async def test_read_all_leaves_no_consumer_and_reports_unreadable(nats_url: str) -> None:
    backend = NatsBackend(NatsSettings.from_url(nats_url))
    await backend.connect()
    try:
        agent = f"agent-{uuid.uuid4().hex[:10]}"
        sent = [envelope.build(subject=subjects.direct(agent), sender_id="pm", recipient_id=agent, content=f"m{i}")
                for i in range(30)]
        await backend.publish_many(sent[:10])
        await backend.js.publish(subjects.direct(agent), b"not an envelope")
        await backend.publish_many(sent[10:])
        unreadable: list[bytes] = []
        got = [m.id async for m in backend.read_all(subjects.direct(agent), on_unreadable=unreadable.append)]
        assert got == [m.id for m in sent]
        assert unreadable == [b"not an envelope"]
        assert await _readers(backend) == []

        async with contextlib.aclosing(backend.read_all(subjects.direct(agent))) as reading:
            async for _ in reading:
                assert len(await _readers(backend)) == 1
                break
        assert await _readers(backend) == []
    finally:
        await backend.close()
