"""The attempt a handler sees after nats-server is killed with SIGKILL and restarted (issue 17 item 3).

nats-server writes a file-stored R1 consumer's delivery state (delivered sequence, pending,
redelivery counts) at most every 100 ms, whatever ``sync_interval`` says. A ``kill -9`` within
that window loses the record of the last deliveries: after the restart the server hands those
stream messages out again as first deliveries (``num_delivered == 1``). The subscription
remembers what it handed out, so a message it already saw comes back with a higher attempt.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from squadbus.backends.nats import NatsBackend
from squadbus.backends.nats.attempts import AttemptLedger
from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus
from squadbus.testing.conformance import eventually
from squadbus.testing.servers.nats import NatsServer

pytestmark = pytest.mark.nats

COUNT = 60
ROUNDS = 3


@pytest.fixture
def restartable_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A private server of its own (the test kills it), stopped by PID at the end."""
    with NatsServer(tmp_path / "nats") as server:
        yield server


class FailFirstSight:
    """Fails (nacks) the first delivery of each id and acks the next; the first call waits for ``release``."""

    def __init__(self) -> None:
        self.attempts: dict[uuid.UUID, list[int]] = defaultdict(list)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, delivery: Delivery) -> None:
        self.entered.set()
        await self.release.wait()
        seen = self.attempts[delivery.message.id]
        seen.append(delivery.attempt)
        if len(seen) == 1:
            raise RuntimeError("first sight: try again")

    def done(self, ids: set[uuid.UUID]) -> bool:
        return all(len(self.attempts.get(i, ())) >= 2 for i in ids)


async def test_redelivery_after_server_kill9_counts_as_a_further_attempt(restartable_server: NatsServer) -> None:
    """Every round: COUNT messages are handed to the subscription and none is settled when the
    server is killed; after the restart each message is seen at least twice and its n-th handler
    call must have ``attempt >= n``."""
    server = restartable_server
    agent = f"agent-{uuid.uuid4().hex[:8]}"
    handler = FailFirstSight()
    options = ConsumerOptions(ack_wait=30, batch_size=COUNT * 2, max_deliver=10, backoff_base=0.01, backoff_max=0.05)
    async with Bus.from_url(server.url) as producer, Bus.from_url(server.url) as consumer:
        await consumer.subscribe(subjects.direct(agent), handler, group="workers", options=options)
        backend = consumer.backend
        assert isinstance(backend, NatsBackend)
        nc = backend.nc
        for _ in range(ROUNDS):
            handler.entered.clear()
            handler.release.clear()
            ids = {(await producer.send("pm", agent, f"job-{i}")).id for i in range(COUNT)}
            await asyncio.wait_for(handler.entered.wait(), 10)
            reconnects = nc.stats["reconnects"]
            server.kill9()  # within nats-server's 100 ms consumer-state flush window
            server.start()
            # Settled while disconnected, a nack is lost and the message waits for ack_wait.
            await eventually(lambda r=reconnects: nc.stats["reconnects"] > r and nc.is_connected, 20,  # type: ignore[misc]
                             "the consumer reconnected")
            handler.release.set()
            await eventually(lambda ids=ids: handler.done(ids), 60, "every message seen twice")  # type: ignore[misc]
        wrong = {str(i): a for i, a in handler.attempts.items() if any(n < k for k, n in enumerate(a, 1))}
        assert not wrong, f"{len(wrong)} of {len(handler.attempts)} messages came back with a repeated attempt: " \
                          f"{list(wrong.items())[:5]}"
        assert all(a[0] == 1 for a in handler.attempts.values()), "a message's first handler call is attempt 1"


def test_ledger_takes_the_higher_of_the_server_count_and_what_it_handed_out() -> None:
    ledger = AttemptLedger(open_limit=10, recent=2)
    assert ledger.attempt(7, 1) == 1
    assert ledger.attempt(7, 1) == 2, "the server forgot the first delivery"
    assert ledger.attempt(7, 5) == 5, "the server knows of deliveries elsewhere"
    ledger.settled(7)
    assert ledger.attempt(7, 1) == 6, "an ack lost in a crash: the redelivery is a further attempt"
    for seq in (8, 9, 10):
        ledger.attempt(seq, 1)
        ledger.settled(seq)
    assert ledger.attempt(8, 1) == 1, "only the last `recent` settled messages are remembered"
    assert len(ledger) <= 10 + 2


def test_ledger_keeps_at_most_open_limit_unsettled() -> None:
    ledger = AttemptLedger(open_limit=3)
    for seq in range(10):
        ledger.attempt(seq, 1)
    assert len(ledger) == 3
