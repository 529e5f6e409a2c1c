"""Consumer-group figures of the memory backend (``DescribesGroups``), read from its buffers.

Exact at the moment of the call: ``lag`` is what a group buffered and never
handed out, ``pending`` what it handed out and is not settled yet (in a
handler, or nacked and waiting for its redelivery). ``dead_letters`` counts
the group's dead letters still in the replay window (None without one);
``redeliveries`` is None (attempts of deliveries in handlers are not kept).
Cost: one pass over the buffers and one over the replay window.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from squadbus.core import subjects
from squadbus.core.backend import GroupFigures

if TYPE_CHECKING:
    from squadbus.backends.memory.backend import MemoryBackend
    from squadbus.backends.memory.group import GroupBuffer

_DLQ = subjects.DLQ_PREFIX + "."


def group_figures(backend: MemoryBackend) -> list[GroupFigures]:
    """One :class:`GroupFigures` per named group of ``backend``."""
    groups: Iterable[GroupBuffer] = list(backend._groups.values())
    retained = backend.settings.retain_messages > 0
    dead = Counter(e[1][len(_DLQ):] for e in backend._log if e[1].startswith(_DLQ)) if retained else None
    out = []
    for group in groups:
        assert group.name is not None  # only named groups are in backend._groups
        waiting = sum(1 for _, delivered in group.buffer if delivered)
        out.append(GroupFigures(
            group=group.name,
            subject=group.pattern,
            lag=len(group.buffer) - waiting,
            pending=group.inflight + waiting + len(group.timers),
            dead_letters=dead.get(group.name, 0) if dead is not None else None,
        ))
    return out
