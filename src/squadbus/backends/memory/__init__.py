"""The in-process backend: the reference model of the delivery contract.

Not durable across restarts; everything else in ARCHITECTURE.md's delivery
contract holds. How it works:

* Every subscription belongs to a *group*: a named one shared by its members
  (competing consumers), or an anonymous one of its own (``group=None``).
  Each group has a bounded buffer, so a slow group never slows another.
* ``publish`` routes by subject (an exact-subject dict plus a short list of
  wildcard groups, cached per subject), so sending to one agent costs the
  same with 100 or 10,000 agents subscribed. There is no lock: the event loop
  is the only writer.
* When a group's buffer is full, the group's ``slow_consumer`` policy
  decides: ``BLOCK`` makes the publisher wait (up to ``publish_timeout``,
  then :class:`~squadbus.core.errors.BackendTimeout` with nothing
  published); ``DROP_OLDEST`` drops the oldest buffered message and the next
  delivery carries ``gap_before``. A named group with no member left never
  blocks publishers: it drops oldest and logs it. Under ``BLOCK`` a delivery
  given back (nack, redelivery) always returns to the buffer, which may then
  hold more than ``max_pending`` until it drains; publishers wait meanwhile.
* A bounded *replay window* (``retain_messages``) keeps the latest messages
  for :meth:`MemoryBackend.replay` and for groups created with
  ``StartFrom.EARLIEST``; :meth:`MemoryBackend.stats` reports its bounds and
  how many messages left it. History belongs to the HistoryStore.
* Messages are deduplicated by ``id`` within the last ``dedupe_window`` ids.
* An agent's inbox (``open_inbox``) is a member of the group ``inbox-<agent>``
  with no task while it has nothing to hand over (:mod:`.inboxes`).
* ``ack_wait`` is not enforced: a handler that hangs is visible in-process;
  closing its subscription returns its delivery to the group.
"""

from squadbus.backends.memory.backend import MemoryBackend, from_url
from squadbus.backends.memory.settings import MemorySettings

__all__ = ["MemoryBackend", "MemorySettings", "from_url"]
