"""/metrics per consumer group: the backend's group figures, cached and bounded; dead letters; publish latency."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from squadbus.backends.memory import MemoryBackend
from squadbus.backends.nats import NatsBackend, NatsSettings
from squadbus.core import envelope, subjects
from squadbus.core.backend import GroupFigures
from squadbus.core.bus import Bus
from squadbus.testing.servers.nats import NatsServer
from squadbus.testing.servers.process import freeze
from tests.core.group_scenario import DEAD, HELD, WAITING, scenario, wait_for_figures
from tests.service.conftest import Api, MakeApp, asgi, message
from tests.service.test_metrics import samples

HANG_GUARD = 60.0  # a scrape that takes this long is a hang, not a slow machine


async def scrape(api: Api) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await asyncio.wait_for(api.client.get("/metrics"), HANG_GUARD)
    assert response.status_code == 200
    return samples(response.text)


def labels(**values: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(values.items()))


class CountingMemoryBackend(MemoryBackend):
    """The memory backend, counting how often its groups are described."""

    described = 0

    async def group_figures(self) -> list[GroupFigures]:
        self.described += 1
        return await super().group_figures()


async def test_group_gauges_show_lag_pending_and_dead_letters(make_app: MakeApp) -> None:
    backend = MemoryBackend()
    async with Bus(backend) as bus, asgi(make_app(bus=bus, workers=())) as api, scenario(bus, "workers") as pattern:
        await wait_for_figures(backend, "workers", lambda f: f.pending == HELD and f.dead_letters == DEAD)
        got = await scrape(api)
    assert got[("squadbus_group_figures_up", ())] == 1
    assert got[("squadbus_group_lag", labels(group="workers", subject=pattern))] == WAITING
    assert got[("squadbus_group_pending", labels(group="workers", subject=pattern))] == HELD
    assert got[("squadbus_group_dead_letters", labels(group="workers"))] == DEAD
    assert not any(name == "squadbus_group_redeliveries" for name, _ in got), "memory cannot tell: no sample"
    assert got[("squadbus_group_figures_omitted", ())] == 0
    assert got[("squadbus_info", labels(backend="memory", version=_version()))] == 1


async def test_scrapes_share_one_read_within_max_age(make_app: MakeApp) -> None:
    backend = CountingMemoryBackend()
    async with Bus(backend) as bus, asgi(make_app(bus=bus, workers=())) as api:
        reader = api.service.metrics.sources.groups
        reader.max_age = 3600.0
        await asyncio.gather(*(scrape(api) for _ in range(5)))
        assert backend.described == 1
        reader.max_age = 0.0
        await scrape(api)
        assert backend.described == 2


async def test_publish_latency_is_observed_per_http_call(make_app: MakeApp) -> None:
    async with asgi(make_app(workers=())) as api:
        assert (await api.client.post("/v1/messages", json=message())).status_code == 201
        batch = {"messages": [message(), message()]}
        assert (await api.client.post("/v1/messages:batch", json=batch)).status_code == 200
        got = await scrape(api)
    assert got[("squadbus_publish_latency_seconds_count", labels(backend="memory"))] == 2


async def test_dead_letters_are_counted_per_group_with_bounded_labels(make_app: MakeApp) -> None:
    # the db-writer is to call record_dead_letters with the dead letters it acks unstored
    async with asgi(make_app(workers=())) as api:
        metrics = api.service.metrics
        metrics.groups.max_types = 2
        plain = envelope.build(subject="agent.message.ops", sender_id="pm", content="x")
        dead = [plain.evolve(id=envelope.new_id(), subject=subjects.dead_letter(g)) for g in ("a", "a", "b", "c", "d")]
        metrics.record_dead_letters([plain, *dead])
        got = await scrape(api)
    counted = {k[1]: v for k, v in got.items() if k[0] == "squadbus_dead_letters_total"}
    assert counted == {labels(group="a"): 2, labels(group="b"): 1, labels(group="other"): 2}


async def test_dead_letters_acked_by_the_db_writer_are_counted(make_app: MakeApp) -> None:
    async with asgi(make_app(workers=("db-writer",))) as api:
        plain = envelope.build(subject="agent.message.ops", sender_id="pm", content="x")
        bus = api.service.bus
        for group in ("billing", "billing", "triage"):
            await bus.publish(plain.evolve(id=envelope.new_id(), subject=subjects.dead_letter(group)))
        counted: dict[object, float] = {}
        for _ in range(500):
            got = await scrape(api)
            counted = {k[1]: v for k, v in got.items() if k[0] == "squadbus_dead_letters_total"}
            if sum(counted.values()) >= 3:
                break
            await asyncio.sleep(0.02)
    assert counted == {labels(group="billing"): 2, labels(group="triage"): 1}


# ---- a broker that is down or hangs ------------------------------------------------------------------


@pytest.fixture
async def nats_app(tmp_path: Path, make_app: MakeApp) -> AsyncIterator[tuple[NatsServer, Api]]:
    """A private nats-server (this test stops it), a Bus on it with one group, and an app on that Bus."""
    with NatsServer(tmp_path / "nats") as server:
        bus = Bus(NatsBackend(NatsSettings.from_url(f"{server.url}?connect_timeout=5")))
        await bus.start()
        try:
            await bus.subscribe("agent.message.ops", _noop, group="watchers")
            await bus.send("pm", "nobody", "not for the group")
            async with asgi(make_app(bus=bus, workers=())) as api:
                yield server, api
        finally:
            if server.proc is not None and server.running:
                os.kill(server.proc.pid, signal.SIGCONT)
            await bus.close()


@pytest.mark.nats
async def test_scrape_goes_on_when_the_broker_is_down(nats_app: tuple[NatsServer, Api]) -> None:
    server, api = nats_app
    got = await scrape(api)
    assert got[("squadbus_group_figures_up", ())] == 1
    assert got[("squadbus_group_lag", labels(group="watchers", subject="agent.message.ops"))] == 0
    server.stop()
    api.service.metrics.sources.groups.max_age = 0.0
    got = await scrape(api)
    assert got[("squadbus_group_figures_up", ())] == 0
    assert not any(name == "squadbus_group_lag" for name, _ in got)
    assert ("squadbus_bus_deliveries_total", ()) in got, "the rest of the scrape is served"


@pytest.mark.nats
async def test_scrape_goes_on_when_the_broker_hangs(nats_app: tuple[NatsServer, Api]) -> None:
    server, api = nats_app
    reader = api.service.metrics.sources.groups
    reader.timeout, reader.max_age = 0.5, 0.0  # the broker would make nats-py wait connect_timeout (5 s)
    assert (await scrape(api))[("squadbus_group_figures_up", ())] == 1
    assert server.proc is not None
    freeze(server.proc.pid)  # returns once every thread is stopped: os.kill returns before
    try:
        got = await scrape(api)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert got[("squadbus_group_figures_up", ())] == 0
    async with asyncio.timeout(30):  # and it comes back
        while (await scrape(api))[("squadbus_group_figures_up", ())] != 1:
            await asyncio.sleep(0.1)


def _version() -> str:
    from squadbus import __version__

    return __version__


async def _noop(*_: object) -> None:
    return None



async def test_groups_whose_labels_meet_make_one_series(make_app: MakeApp) -> None:
    # label values are cut at 64 characters: two such groups must not repeat a series
    backend = MemoryBackend()
    async with Bus(backend) as bus, asgi(make_app(bus=bus, workers=())) as api:
        for suffix in ("a", "b"):
            await bus.subscribe("agent.message.ops", _noop, group="x" * 64 + suffix)
        response = await api.client.get("/metrics")
    lines = [line for line in response.text.splitlines() if line.startswith('squadbus_group_lag{group="' + "x" * 64)]
    assert len(lines) == 1, lines
