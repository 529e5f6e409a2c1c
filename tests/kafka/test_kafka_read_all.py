"""KafkaBackend.read_all (ReadsAll) beyond the conformance case, on tansu: every partition read to
its real end after batched publishes, records that are not envelopes reported, an early close."""

from __future__ import annotations

import contextlib
import uuid

import pytest

from squadbus.backends.kafka import KafkaBackend, KafkaSettings
from squadbus.backends.kafka._driver import AIOKafkaProducer
from squadbus.core import envelope, subjects
from squadbus.testing.servers.kafka import TansuServer
from tests.kafka.conftest import GROUP_OPTIONS

pytestmark = pytest.mark.kafka


async def test_read_all_reads_every_partition_to_its_end_and_reports_unreadable(tansu: TansuServer) -> None:
    url = f"{tansu.url}?partitions=4&idempotence=off&topic=r{uuid.uuid4().hex[:10]}&{GROUP_OPTIONS}"
    backend = KafkaBackend(KafkaSettings.from_url(url))
    await backend.connect()
    producer = AIOKafkaProducer(bootstrap_servers=[tansu.bootstrap])
    try:
        executions = [uuid.uuid4() for _ in range(8)]
        sent = [envelope.build(subject=subjects.direct(f"dev-{i % 5}"), sender_id="pm", recipient_id=f"dev-{i % 5}",
                               content=f"m{i}", task_execution_id=executions[i % 8]) for i in range(1200)]
        for start in range(0, len(sent), 400):
            await backend.publish_many(sent[start:start + 400])
        await producer.start()
        await producer.send_and_wait(backend.layout.main, b"not an envelope", key=b"k")
        unreadable: list[bytes] = []
        got = [m async for m in backend.read_all(subjects.ALL, on_unreadable=unreadable.append)]
        assert sorted(m.id for m in got) == sorted(m.id for m in sent)
        for execution in executions:
            assert [m.id for m in got if m.task_execution_id == execution] == \
                [m.id for m in sent if m.task_execution_id == execution]
        assert unreadable == [b"not an envelope"]
        dev1 = [m.id async for m in backend.read_all(subjects.direct("dev-1"))]
        assert sorted(dev1) == sorted(m.id for m in sent if m.recipient_id == "dev-1")

        async with contextlib.aclosing(backend.read_all(subjects.ALL)) as reading:
            async for _ in reading:
                break
    finally:
        await producer.stop()
        await backend.close()
