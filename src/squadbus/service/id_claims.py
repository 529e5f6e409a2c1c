"""Claims on client-set message ids: in this process, and in the store for replicas.

A POST with a client-set id looks the id up, publishes, then writes through.
Two requests racing on one id would both miss the lookup and both publish.
:class:`IdClaims` holds the id from the lookup until the write, so two
requests of this process run one after the other: the second sees the
first's row (200 for the same sender, 409 for another) and publishes nothing.
Replicas sharing a store also claim the id there before publishing
(:class:`~squadbus.store.base.ClaimsIds`, one atomic insert): the claim
records the message's :func:`fingerprint`, so only one message is ever
published under an id, while the same message sent again (a retry, even
after a crash between claim and publish) may always go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Iterable
from uuid import UUID

from squadbus.core.envelope import Message


def fingerprint(message: Message) -> bytes:
    """SHA-256 of what the client chose: sender, recipient, domain, subject, type, execution, content, metadata.

    Equal for two sends of the same request body; ``id``, ``created_at`` and
    the server-set headers are left out.
    """
    m = message
    execution = None if m.task_execution_id is None else str(m.task_execution_id)
    chosen = [m.sender_id, m.recipient_id, m.domain, m.subject, m.message_type, execution, m.content, m.metadata]
    canonical = json.dumps(chosen, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).digest()


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
