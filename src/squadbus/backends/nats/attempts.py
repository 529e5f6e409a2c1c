"""The attempt number of a JetStream delivery: the server's count, raised by what this process saw.

``attempt`` is the server's ``num_delivered`` (the ``<delivered>`` token of the ack subject)
unless this process already handed the same stream message of the same consumer to a handler:
then it is at least one more than the attempt it had then.

Why the server's count alone is not enough: nats-server writes a file-stored R1 consumer's
state (delivered sequence, pending list, redelivery counts) from a flusher at most every
100 ms, whatever ``sync_interval`` says (``consumerFileStore.flushLoop``). A ``kill -9`` of the
server within that window forgets the last deliveries; after the restart it hands those
stream messages out again with ``num_delivered == 1``, so retry and dead-letter counting would
start over. A replicated consumer (R3, server 2.11.2 or later) sends a message only after its
delivery is on a quorum, so its count survives a node's crash.

What the ledger cannot know: deliveries made to another process (a member that died, or any
other member of the group), and anything from before this process started. Memory is bounded:
unsettled messages (bounded by the consumer's ``max_ack_pending`` on the server) plus the last
``recent`` settled ones, whose ack may have been lost in the same crash.
"""

from __future__ import annotations

from collections import OrderedDict

RECENTLY_SETTLED = 4096


class AttemptLedger:
    """Attempts handed out per stream sequence for one consumer in this process."""

    __slots__ = ("_open", "_open_limit", "_recent", "_recent_limit")

    def __init__(self, *, open_limit: int, recent: int = RECENTLY_SETTLED) -> None:
        self._open: dict[int, int] = {}
        self._recent: OrderedDict[int, int] = OrderedDict()
        self._open_limit = max(1, open_limit)
        self._recent_limit = max(1, recent)

    def attempt(self, stream_seq: int, num_delivered: int) -> int:
        """The attempt of a delivery the server counts as ``num_delivered``; records it as open."""
        before = self._open.get(stream_seq)
        if before is None:
            before = self._recent.pop(stream_seq, 0)
        attempt = num_delivered if num_delivered > before else before + 1
        self._open[stream_seq] = attempt
        if len(self._open) > self._open_limit:
            # Only when the server stopped redelivering messages we never settled (its max_deliver).
            del self._open[next(iter(self._open))]
        return attempt

    def settled(self, stream_seq: int) -> None:
        """The message was acked or terminated: keep its count only among the recent ones."""
        attempt = self._open.pop(stream_seq, None)
        if attempt is None:
            return
        recent = self._recent
        recent[stream_seq] = attempt
        if len(recent) > self._recent_limit:
            recent.popitem(last=False)

    def __len__(self) -> int:
        return len(self._open) + len(self._recent)
