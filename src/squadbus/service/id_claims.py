"""Per-id claims: one request at a time per client-set message id, in this process.

A POST with a client-set id looks the id up, publishes, then writes through.
Two requests racing on one id would both miss the lookup and both publish;
holding the id from the lookup until the write makes them run one after the
other, so the second sees the first's row (200 for the same sender, 409 for
another) and publishes nothing. Replicas do not share claims: between
processes the store's write decides (the loser gets 409, see
:mod:`.routes_messages`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from uuid import UUID


class IdClaims:
    """Claims on message ids held by requests of this process (see the module docstring)."""

    def __init__(self) -> None:
        self._held: dict[UUID, asyncio.Event] = {}

    @property
    def held(self) -> int:
        """How many ids are claimed right now."""
        return len(self._held)

    @contextlib.asynccontextmanager
    async def hold(self, ids: Iterable[UUID]) -> AsyncIterator[None]:
        """Claim every id of ``ids`` at once (waiting while another request holds any), release on exit.

        All or nothing, with no await between checking and taking, so two
        requests claiming overlapping sets cannot deadlock.
        """
        wanted = set(ids)
        while True:
            busy = next((self._held[i] for i in wanted if i in self._held), None)
            if busy is None:
                break
            await busy.wait()
        released = asyncio.Event()
        for ident in wanted:
            self._held[ident] = released
        try:
            yield
        finally:
            for ident in wanted:
                self._held.pop(ident, None)
            released.set()
