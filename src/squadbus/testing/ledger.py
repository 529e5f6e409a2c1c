"""The ledger of a fault run: every send's outcome, every delivery, and the checker (Jepsen-style).

A run records each send as ``ok`` (the send returned: the backend stored it),
``failed`` (a typed error saying it was not stored) or ``unknown`` (a timeout
or an untyped error: it may be stored), with its producer, sequence number
and execution. Consumers record each *completed* delivery (the handler
returned and the message was acked) with its attempt and the time; members in
other processes write the same lines to a file (:func:`completion_line`),
merged with :meth:`Ledger.load`. :meth:`Ledger.check` then counts:

* ``lost``: acknowledged sends never completed by any consumer;
* ``duplicates``: completions beyond the first of a message (at-least-once
  allows them; the db-writer removes them from history);
* ``unknown_delivered``: sends of unknown outcome that were in fact delivered;
* ``failed_delivered``: sends the sender was told *failed* (not stored) that were
  delivered all the same: a broken promise, the error should have said "unknown";
* ``order_violations``: within one execution and one producer, a message
  completed before an earlier-sent one (first completions compared);
* ``max_redelivery_s``: the longest time from a message's send to its first
  completion, among messages delivered with ``attempt > 1`` (how long a dead
  consumer's messages waited).

Times are ``time.time()``: all processes of a run are on one machine.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.core.errors import ConnectionLost, InvalidMessage, PublishFailed, SquadbusError

Outcome = Literal["ok", "failed", "unknown"]


@dataclass(slots=True)
class Sent:
    """One send attempt and what the sender was told."""

    id: uuid.UUID
    producer: str
    seq: int
    execution: uuid.UUID
    outcome: Outcome
    at: float
    error: str = ""


@dataclass(slots=True)
class Completion:
    """One delivery a consumer handled and acked."""

    id: uuid.UUID
    consumer: str
    attempt: int
    at: float


def completion_line(message: Message, consumer: str, attempt: int) -> str:
    """The line a consumer in another process writes per completed delivery (read by :meth:`Ledger.load`)."""
    return f"{message.id} {consumer} {attempt} {time.time():.6f}\n"


@dataclass(slots=True)
class Report:
    """What :meth:`Ledger.check` found; ``as_row()`` is a line of docs/reliability.md's table."""

    fault: str
    backend: str
    sent: int
    acknowledged: int
    failed: int
    unknown: int
    delivered: int
    lost: int
    duplicates: int
    unknown_delivered: int
    failed_delivered: int
    order_violations: int
    max_redelivery_s: float
    notes: str = ""
    lost_ids: list[str] = field(default_factory=list)
    failed_delivered_errors: list[str] = field(default_factory=list)

    def as_row(self) -> dict[str, object]:
        row = asdict(self)
        row["lost_ids"] = self.lost_ids[:10]
        row["failed_delivered_errors"] = self.failed_delivered_errors[:5]
        return row


class Ledger:
    """Sends through a Bus, recording outcomes; collects completions; checks the run."""

    def __init__(self) -> None:
        self.sent: dict[uuid.UUID, Sent] = {}
        self.completions: list[Completion] = []
        self._seq: dict[str, int] = defaultdict(int)

    async def send(self, bus: Bus, producer: str, recipient: str, execution: uuid.UUID) -> Sent:
        """Send one message and record its outcome (never raises a SquadbusError)."""
        seq = self._seq[producer]
        self._seq[producer] = seq + 1
        message_id = uuid.uuid4()
        at = time.time()
        outcome: Outcome = "ok"
        error = ""
        try:
            await bus.send(producer, recipient, f"{producer}:{seq}", "fault", task_execution_id=execution,
                           id=message_id)
        except (PublishFailed, ConnectionLost, InvalidMessage) as exc:
            outcome, error = "failed", f"{type(exc).__name__}: {exc}"
        except SquadbusError as exc:  # BackendTimeout and the rest: it may be stored
            outcome, error = "unknown", f"{type(exc).__name__}: {exc}"
        record = Sent(message_id, producer, seq, execution, outcome, at, error)
        self.sent[message_id] = record
        return record

    def completed(self, message: Message, consumer: str, attempt: int) -> None:
        """Record a delivery handled and acked in this process."""
        self.completions.append(Completion(message.id, consumer, attempt, time.time()))

    def load(self, path: Path) -> None:
        """Merge the completion lines another process wrote to ``path``."""
        if not path.exists():
            return
        for line in path.read_text().splitlines():
            if line == "ready":
                continue
            message_id, consumer, attempt, at = line.split()
            self.completions.append(Completion(uuid.UUID(message_id), consumer, int(attempt), float(at)))

    @property
    def acknowledged(self) -> set[uuid.UUID]:
        return {i for i, s in self.sent.items() if s.outcome == "ok"}

    def done(self) -> set[uuid.UUID]:
        """Ids completed at least once."""
        return {c.id for c in self.completions}

    def check(self, fault: str, backend: str, notes: str = "") -> Report:
        """Count lost, duplicated, unknown-but-delivered, out-of-order and the redelivery delay."""
        first: dict[uuid.UUID, Completion] = {}
        count: dict[uuid.UUID, int] = defaultdict(int)
        redelivered: set[uuid.UUID] = set()
        for c in sorted(self.completions, key=lambda c: c.at):
            count[c.id] += 1
            first.setdefault(c.id, c)
            if c.attempt > 1:
                redelivered.add(c.id)
        acknowledged = self.acknowledged
        lost = sorted(str(i) for i in acknowledged - first.keys())
        by_stream: dict[tuple[uuid.UUID, str], list[Sent]] = defaultdict(list)
        for s in self.sent.values():
            if s.id in first:
                by_stream[(s.execution, s.producer)].append(s)
        violations = 0
        for sends in by_stream.values():
            highest = -1
            for s in sorted(sends, key=lambda s: first[s.id].at):
                if s.seq < highest:
                    violations += 1
                highest = max(highest, s.seq)
        failed_delivered = [s for i, s in self.sent.items() if s.outcome == "failed" and i in first]
        delays = [first[i].at - self.sent[i].at for i in redelivered if i in self.sent]
        outcomes = [s.outcome for s in self.sent.values()]
        return Report(
            fault=fault, backend=backend, sent=len(self.sent), acknowledged=len(acknowledged),
            failed=outcomes.count("failed"), unknown=outcomes.count("unknown"),
            delivered=len(first.keys() & self.sent.keys()), lost=len(lost),
            duplicates=sum(n - 1 for n in count.values()),
            unknown_delivered=sum(1 for i, s in self.sent.items() if s.outcome == "unknown" and i in first),
            failed_delivered=len(failed_delivered),
            failed_delivered_errors=[s.error for s in failed_delivered],
            order_violations=violations, max_redelivery_s=round(max(delays, default=0.0), 2),
            notes=notes, lost_ids=lost,
        )


def append_report(path: Path | None, report: Report) -> None:
    """Append ``report`` as a JSON line to ``path`` (the faults report :file:`make faults` turns into a table)."""
    if path is None:
        return
    with path.open("a") as out:
        out.write(json.dumps(report.as_row()) + "\n")


def table(rows: list[dict[str, object]]) -> str:
    """docs/reliability.md's table: the reports of ``rows`` summed per (fault, backend), worst delay kept."""
    keys = ("sent", "acknowledged", "failed", "unknown", "delivered", "lost", "duplicates", "unknown_delivered",
            "failed_delivered", "order_violations")
    merged: dict[tuple[str, str], dict[str, float]] = {}
    for row in rows:
        key = (str(row["fault"]), str(row["backend"]))
        total = merged.setdefault(key, dict.fromkeys(("rounds", *keys, "max_redelivery_s"), 0.0))
        total["rounds"] += 1
        for name in keys:
            total[name] += float(row.get(name, 0))  # type: ignore[arg-type]
        total["max_redelivery_s"] = max(total["max_redelivery_s"], float(row["max_redelivery_s"]))  # type: ignore[arg-type]
    head = ("fault", "backend", "rounds", *keys, "max redelivery s")
    lines = ["| " + " | ".join(h.replace("_", " ") for h in head) + " |", "|" + "---|" * len(head)]
    for (fault, backend), total in merged.items():
        cells = [fault, backend, *(f"{total[k]:.0f}" for k in ("rounds", *keys)), f"{total['max_redelivery_s']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    report_rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    sys.stdout.write(table(report_rows) + "\n")
