"""An optional backend ability: serve many agents' direct inboxes through resources shared per Bus.

Without it an inbox is one group subscription on the agent's direct subject,
which costs a broker connection or consumer per agent (issue 15,
docs/design/inboxes.md). A backend that implements :class:`MultiplexesInboxes`
serves every open agent of a Bus with a fixed set of connections; the
:class:`~squadbus.core.inbox.Inbox` uses it instead of ``Backend.subscribe``
for the direct subject when the backend has it (checked with ``isinstance``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from squadbus.core.backend import ConsumerOptions, RawHandler, Subscription


@runtime_checkable
class MultiplexesInboxes(Protocol):
    """A backend whose agents' inboxes cost no broker connection or consumer of their own."""

    async def open_inbox(
        self, agent_id: str, handler: RawHandler, *, group: str, options: ConsumerOptions
    ) -> Subscription:
        """Start handing ``agent_id``'s direct messages (``subjects.direct(agent_id)``) to ``handler``.

        Contract, the same as a ``subscribe`` of that subject in the durable
        group ``group`` starting at ``StartFrom.EARLIEST`` with
        ``max_in_flight=1``:

        * messages published before the first open wait for it (within
          retention), and so does whatever an earlier holder left unacked;
        * ``handler`` gets one delivery of this agent at a time, in publish
          order, and each call is awaited (the handler settles it) before the
          next delivery of this agent is handed over; a nacked delivery comes
          back (``attempt`` + 1, after its delay) before any later message;
        * ``options`` apply to this agent (``ack_wait``, ``max_deliver``, ...);
          a delivery left unsettled by a holder that died is delivered again
          once ``ack_wait`` has passed, to whichever process opens the agent;
        * a second open of an agent already open in the same backend instance
          gets nothing until the first is closed, then takes over.

        ``close()`` of the returned subscription stops handing deliveries to
        ``handler`` and gives back what it held unsettled; it is idempotent.
        Raises a :class:`~squadbus.core.errors.BackendError` when the broker
        cannot be reached.
        """
        ...


class OpenAgent(Protocol):
    """What a backend's inbox hub keeps per open agent, as an :class:`InboxHolder` sees it."""

    @property
    def subject(self) -> str:
        """The agent's direct subject."""
        ...

    holders: list[Any]
    """Its opens in this hub, the served one first (:class:`InboxHolder` objects)."""


AgentT = TypeVar("AgentT", bound=OpenAgent)


class HoldsInboxes(Protocol):
    """A backend's inbox hub, as an :class:`InboxHolder` sees it."""

    async def close_holder(self, holder: InboxHolder[Any]) -> None:
        """Close one open of an agent (idempotent)."""
        ...


class InboxHolder(Generic[AgentT]):
    """One open of an agent's inbox in a backend's hub: the Subscription ``open_inbox`` returns.

    The hub serves an agent's first holder; the others wait until those before them close.
    """

    __slots__ = ("_hub", "agent", "closed", "group", "handler", "options")

    def __init__(self, hub: HoldsInboxes, agent: AgentT, handler: RawHandler, group: str,
                 options: ConsumerOptions) -> None:
        self._hub = hub
        self.agent = agent
        self.handler = handler
        self.group = group
        self.options = options
        self.closed = False

    @property
    def pattern(self) -> str:
        """The agent's direct subject."""
        return self.agent.subject

    async def close(self) -> None:
        """Stop handing this agent's deliveries here (the hub hands back what it holds). Idempotent."""
        await self._hub.close_holder(self)

    def leave(self) -> bool:
        """Mark this open closed and take it off its agent's holders, for the hub's ``close_holder``;
        False when it was closed already (then the hub has nothing to do)."""
        if self.closed:
            return False
        self.closed = True
        holders = self.agent.holders
        if self in holders:
            holders.remove(self)
        return True


INBOX_GROUP_PREFIX = "inbox-"
"""An agent's inbox reads its direct subject in the consumer group ``inbox-<agent>`` (``Inbox.group``)."""


@dataclass(frozen=True, slots=True)
class InboxPresence:
    """An agent whose inbox is open somewhere, as the broker tells it.

    ``holder``: who serves it (a backend instance's name, e.g. ``host-pid-suffix``), None when the
    backend cannot tell; ``since``: when that holder took it, None when the backend cannot tell.
    """

    agent_id: str
    holder: str | None = None
    since: datetime | None = None


@runtime_checkable
class ListsInboxes(Protocol):
    """A backend that can list the agents whose inbox is open now, in any process (the dashboard's Agents)."""

    async def open_inboxes(self) -> Sequence[InboxPresence]:
        """One :class:`InboxPresence` per agent with an open inbox, whichever process holds it.

        Contract: an inbox opened (``Bus.inbox(...).open()`` returned) is listed
        until it is closed; after its ``close()`` returned it is no longer listed
        (an inbox whose process died may stay listed until the broker's lease or
        liveness record lapses). Reads only, creates nothing; order unspecified.
        Raises a :class:`~squadbus.core.errors.BackendError` when the broker does
        not answer; callers bound it with a timeout of their own.
        """
        ...
