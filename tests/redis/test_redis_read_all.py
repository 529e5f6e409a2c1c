"""RedisBackend.read_all (ReadsAll) beyond the conformance case: every partition stream read up to
its last entry at the start, entries that are not envelopes reported, not yielded."""

from __future__ import annotations

import uuid

import pytest

from squadbus.backends.redis import RedisBackend, RedisSettings
from squadbus.backends.redis._driver import call
from squadbus.core import envelope, subjects

pytestmark = pytest.mark.redis


async def test_read_all_reads_every_partition_and_reports_unreadable(redis_url: str) -> None:
    backend = RedisBackend(RedisSettings.from_url(redis_url))
    await backend.connect()
    try:
        executions = [uuid.uuid4() for _ in range(6)]
        sent = [envelope.build(subject=subjects.direct(f"dev-{i % 3}"), sender_id="pm", recipient_id=f"dev-{i % 3}",
                               content=f"m{i}", task_execution_id=executions[i % 6] if i % 7 else None)
                for i in range(2500)]
        await backend.publish_many(sent)
        await call(backend._client, "XADD", backend.layout.partition_stream(0), "*", "m", b"not an envelope")
        unreadable: list[bytes] = []
        got = [m async for m in backend.read_all(subjects.ALL, on_unreadable=unreadable.append)]
        assert sorted(m.id for m in got) == sorted(m.id for m in sent)
        for execution in executions:
            assert [m.id for m in got if m.task_execution_id == execution] == \
                [m.id for m in sent if m.task_execution_id == execution]
        assert unreadable == [b"not an envelope"]
        dev2 = [m.id async for m in backend.read_all(subjects.direct("dev-2"))]
        assert sorted(dev2) == sorted(m.id for m in sent if m.recipient_id == "dev-2")
    finally:
        await backend.close()
