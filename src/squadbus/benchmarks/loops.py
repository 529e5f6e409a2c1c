"""Which event loop a benchmark process runs: asyncio's own, or uvloop (``--loop uvloop``).

uvloop comes with the ``server`` extra (uvicorn runs on it). ``squadbus simulate`` (the parent and
every host process) and ``bench/bench_fanout.py`` run asyncio's loop unless asked for uvloop: on
memory:// uvloop measured no better (docs/scaling.md, "Broadcast copies"): a squad broadcast's cost
is waking agents' tasks, which is asyncio's C task code on either loop, and the fan-out hands the
loop one callback for all of them.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

from squadbus.core.errors import ConfigError

T = TypeVar("T")

ASYNCIO = "asyncio"
UVLOOP = "uvloop"
LOOPS = (ASYNCIO, UVLOOP)


def uvloop_installed() -> bool:
    """True when ``import uvloop`` would work."""
    return importlib.util.find_spec("uvloop") is not None


DEFAULT_LOOP = ASYNCIO


def check_loop(name: str) -> str:
    """``name`` if this process can run that loop; raises ConfigError (one line) otherwise."""
    if name not in LOOPS:
        raise ConfigError(f"unknown event loop {name!r}: expected one of {', '.join(LOOPS)}")
    if name == UVLOOP and not uvloop_installed():
        raise ConfigError("--loop uvloop: uvloop is not installed (pip install 'squadbus[server]')")
    return name


def run(main: Coroutine[Any, Any, T], loop: str) -> T:
    """``asyncio.run(main)`` on the event loop named ``loop``."""
    if check_loop(loop) == UVLOOP:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)
