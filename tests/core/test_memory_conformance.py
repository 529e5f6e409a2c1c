"""The conformance suite on the memory backend (the reference model)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from squadbus.backends.memory import MemoryBackend
from squadbus.core.bus import Bus
from squadbus.testing.conformance import BusFactory, ConformanceSuite, Features


class TestMemoryConformance(ConformanceSuite):
    features = Features(name="memory", persistent=False, timeout=5.0, inboxes_multiplexed=True)

    @pytest.fixture
    async def bus_factory(self) -> AsyncIterator[BusFactory]:
        backend = MemoryBackend()
        await backend.connect()

        async def make() -> Bus:
            # Buses share one in-process backend, as agents in one process do.
            return await Bus(backend, owns_backend=False).start()

        yield make
        await backend.close()
