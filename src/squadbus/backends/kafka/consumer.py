"""The consuming side: one AIOKafkaConsumer per subscription.

A subscription is core's consumer runtime (:class:`KafkaConsumer`, a
:class:`~squadbus.core.consumer.Consumer`: handler calls, ``max_in_flight``,
batches, fairness, close) over a :class:`KafkaSubscription`, the
:class:`~squadbus.core.source.DeliverySource` that fetches, keeps each
partition's records and commit floor (:mod:`.partition`), decodes and settles.

* A named squadbus group ``(group, pattern)`` is the Kafka consumer group
  ``durable_name(group, pattern)``; ``group=None`` is a consumer without a
  group, assigned every partition of its topics and positioned at their end
  before ``subscribe`` returns.
* Auto-commit is off. An offset is committed only once every record before
  it in its partition was settled (acked, or dead-lettered then termed), so
  with ``max_in_flight > 1`` the commit never jumps over a record still in a
  handler or waiting for a retry (:mod:`.partition`). Commits are coalesced:
  one in flight at a time, carrying every floor that moved meanwhile.
* ``nack(delay)`` puts the record back in memory and holds *its partition*
  (only) until the delay passed, then delivers the same record again with
  ``attempt + 1``. Attempts are counted in memory per (partition, offset):
  after a consumer crash another member starts counting from 1 again.
* Records not matching the pattern are settled at once (committed past);
  records that are not squadbus envelopes are dead-lettered by a task of the
  source (:mod:`.deadletter`), never handed to the handler.
* On a rebalance, partitions being revoked stop handing out records, wait
  (up to ``ack_wait``) for deliveries in flight to settle, and commit.
* ``close()`` lets the handlers in progress finish (the runtime), then stops
  fetching, commits and leaves the group; records fetched but not handled are
  re-read by the next owner of their partition.

The package splits it by role: :mod:`.source` (:class:`KafkaSubscription`:
fetching, handing out, settling, dead letters), :mod:`.membership` (joining,
the rebalance listener, commits) and this module (:class:`KafkaConsumer`,
the runtime; every name is importable from here).
"""

from __future__ import annotations

from squadbus.backends.kafka.membership import _leave_even_from_generation_zero
from squadbus.backends.kafka.source import KafkaDelivery, KafkaSubscription
from squadbus.core.consumer import Consumer

# KafkaDelivery, KafkaSubscription (.source) and _leave_even_from_generation_zero (.membership, used by
# .inboxes) are importable from here as before the module was split by role.
__all__ = ["KafkaConsumer", "KafkaDelivery", "KafkaSubscription", "_leave_even_from_generation_zero"]


class KafkaConsumer(Consumer[KafkaSubscription]):
    """A subscription: core's consumer runtime over its :class:`KafkaSubscription` (``handler`` per delivery,
    or ``batches``); the source starts fetching before, and commits and leaves the group after, it."""

    @property
    def kafka_group_id(self) -> str | None:
        """The Kafka consumer group id, ``durable_name(group, pattern)``."""
        return self.source.kafka_group_id
