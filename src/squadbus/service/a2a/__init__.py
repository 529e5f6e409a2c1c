"""The A2A edge of ``squadbus serve`` (``pip install squadbus[a2a]``): squad agents reachable by any A2A client.

How A2A maps onto squadbus (docs/a2a.md has the whole story):

* an A2A **Task** is a squadbus execution: the task id is the ``task_execution_id``;
* an A2A **Message** from a client is a squadbus message to the agent
  (``message_type`` ``a2a.task`` opens a task, ``a2a.message`` continues one);
  the agent's messages in the execution become Task messages and status updates
  by their ``message_type`` (:data:`.mapping.STATE_BY_TYPE`);
* an agent declares itself A2A-reachable with :func:`declare` (a registration
  message on the bus, kept by the history store like any other).

This package's ``__init__`` and :mod:`.registry` import no ``a2a-sdk``: agent
code declares itself without the extra; only the edge (:mod:`.routes`) needs it.
"""

from squadbus.service.a2a.registry import EDGE_ID, AgentEntry, Skill, declare, withdraw

__all__ = ["EDGE_ID", "AgentEntry", "Skill", "declare", "withdraw"]
