"""ListsInboxes on memory, a real Redis and a real NATS: an agent that only opened its inbox is listed
as open, with its holder where the broker knows it; after it closes, it is not."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from squadbus.backends.memory import MemoryBackend
from squadbus.backends.nats import NatsBackend, NatsSettings
from squadbus.backends.nats import presence as nats_presence
from squadbus.backends.redis import RedisBackend, RedisSettings
from squadbus.core.backend import Backend
from squadbus.core.bus import Bus
from squadbus.core.inbox_source import InboxPresence, ListsInboxes
from squadbus.testing.servers.nats import NatsServer
from squadbus.testing.servers.redis import RedisServer


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server per test: every stream takes ``agent.>``, so two cannot live on one server."""
    with NatsServer(tmp_path / "nats") as server:
        yield server


def by_agent(found: list[InboxPresence] | tuple[InboxPresence, ...]) -> dict[str, InboxPresence]:
    return {p.agent_id: p for p in found}


async def open_then_close(backend: Backend) -> tuple[dict[str, InboxPresence], dict[str, InboxPresence],
                                                     dict[str, InboxPresence]]:
    """Open two agents' inboxes (nothing sent), list, close one, list; and list before any open."""
    assert isinstance(backend, ListsInboxes)
    async with Bus(backend) as bus:
        before = by_agent(list(await backend.open_inboxes()))
        quiet, other = f"quiet-{uuid.uuid4().hex[:6]}", f"other-{uuid.uuid4().hex[:6]}"
        first = await bus.inbox(quiet).open()
        await bus.inbox(other).open()
        opened = by_agent(list(await backend.open_inboxes()))
        await first.close()
        closed = by_agent(list(await backend.open_inboxes()))
    assert quiet in opened and other in opened
    assert quiet not in closed and other in closed
    return before, opened, closed


async def test_memory_lists_the_open_inboxes_of_its_buses() -> None:
    before, opened, _ = await open_then_close(MemoryBackend())
    assert before == {}
    assert all(p.holder is None and p.since is None for p in opened.values()), "memory keeps neither"


@pytest.mark.redis
async def test_redis_lists_inbox_leases(redis_server: RedisServer) -> None:
    prefix = f"p{uuid.uuid4().hex[:8]}"
    backend = RedisBackend(RedisSettings.from_url(f"{redis_server.url}?prefix={prefix}&block=0.5"))
    before, opened, _ = await open_then_close(backend)
    assert before == {}
    holders = {p.holder for p in opened.values()}
    assert len(holders) == 1 and None not in holders, "both held by this backend instance, named"


@pytest.mark.nats
async def test_nats_lists_leases_of_live_hubs(nats_server: NatsServer) -> None:
    backend = NatsBackend(NatsSettings.from_url(nats_server.url))
    start = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    before, opened, _ = await open_then_close(backend)
    assert before == {}, "no bucket yet: nothing, not an error"
    holders = {p.holder for p in opened.values()}
    assert len(holders) == 1 and None not in holders
    assert all(p.since is not None and p.since >= start for p in opened.values())


@pytest.mark.nats
async def test_nats_leaves_out_a_lease_whose_hub_is_gone(nats_server: NatsServer) -> None:
    """A holder that died leaves its lease; without its hub's liveness key it is not listed as open."""
    backend = NatsBackend(NatsSettings.from_url(nats_server.url))
    async with Bus(backend) as bus:
        await bus.inbox("alive").open()
        js = backend.js
        kv = await js.key_value(f"{backend.settings.stream}-inboxes")
        await kv.put("l.ghost", b"host-1-deadbeef")  # a lease of a hub that never renewed
        assert set(by_agent(list(await backend.open_inboxes()))) == {"alive"}




@pytest.mark.nats
async def test_nats_pages_through_many_keys(nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nats_presence, "_BATCH", 2)  # 5 leases read 2 at a time
    backend = NatsBackend(NatsSettings.from_url(nats_server.url))
    async with Bus(backend) as bus:
        for i in range(5):
            await bus.inbox(f"agent-{i}").open()
        assert set(by_agent(list(await backend.open_inboxes()))) == {f"agent-{i}" for i in range(5)}


@pytest.mark.nats
async def test_nats_lists_more_leases_than_one_direct_get_answers(nats_server: NatsServer) -> None:
    """A multi_last direct get answers for at most 1,024 subjects (413 beyond): 1,100 leases are all listed."""
    backend = NatsBackend(NatsSettings.from_url(nats_server.url))
    async with Bus(backend) as bus:
        await bus.inbox("real").open()
        [real] = await backend.open_inboxes()
        assert real.holder is not None
        prefix = f"$KV.{backend.settings.stream}-inboxes.l."
        for i in range(1100):  # leases of the same live hub, as its opens would write them
            await backend.nc.publish(f"{prefix}many-{i}", real.holder.encode())
        await backend.nc.flush()
        async with asyncio.timeout(30):
            while len(found := await backend.open_inboxes()) < 1101:
                await asyncio.sleep(0.05)
        assert len(found) == 1101 and {p.holder for p in found} == {real.holder}
