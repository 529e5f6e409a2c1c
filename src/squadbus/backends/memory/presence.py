"""Open inboxes of the memory backend (``ListsInboxes``): this process's, read from its groups.

An open inbox is a member of the group ``inbox-<agent>`` on the agent's direct subject
(``Inbox.open`` joins it through ``open_inbox``, see :mod:`.inboxes`; ``close`` removes the member),
so an agent is listed while that group has a member. Every Bus on this backend instance is seen,
nothing else exists; the holder and the time of opening are not kept (None). Cost: one pass over
the named groups.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from squadbus.core import subjects
from squadbus.core.inbox_source import INBOX_GROUP_PREFIX, InboxPresence

if TYPE_CHECKING:
    from squadbus.backends.memory.backend import MemoryBackend


def open_inboxes(backend: MemoryBackend) -> list[InboxPresence]:
    """One :class:`InboxPresence` per inbox group of ``backend`` with a member."""
    out = []
    for (group, pattern), buffer in list(backend._groups.items()):
        agent = group[len(INBOX_GROUP_PREFIX):]
        if group.startswith(INBOX_GROUP_PREFIX) and buffer.members and pattern == subjects.direct(agent):
            out.append(InboxPresence(agent_id=agent))
    return sorted(out, key=lambda p: p.agent_id)
