"""Fixtures of the CLI tests: ``squadbus`` as a user runs it, in subprocesses, beside a served squad."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from squadbus.testing.servers.process import free_port, port_open, spawn, stop, wait_until

SQUADBUS = [sys.executable, "-m", "squadbus"]
# variables that would point a child at something outside the test
_FOREIGN = ("SQUADBUS_URL", "MESSAGE_BUS", "SQUADBUS_STORE_URL", "SQUADBUS_API", "SQUADBUS_TOKEN",
            "SQUADBUS_TOKENS_FILE", "SQUADBUS_DATA_DIR", "XDG_DATA_HOME")


def clean_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a child: this one without squadbus settings, the data directory in the test's tmp."""
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN}
    env["SQUADBUS_DATA_DIR"] = str(data_dir)
    env.update(extra)
    return env


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (a moment ago)."""
    return f"http://127.0.0.1:{free_port()}"


@dataclass
class Served:
    """A ``squadbus serve`` child process and how to reach it."""

    url: str
    data_dir: Path
    proc: subprocess.Popen[bytes]

    def history(self, **params: str) -> list[dict[str, Any]]:
        """Every stored message matching ``params``, read over HTTP (oldest first)."""
        query = "&".join(f"{k}={v}" for k, v in {"limit": "1000", **params}.items())
        with urllib.request.urlopen(f"{self.url}/v1/messages?{query}", timeout=10) as response:
            items: list[dict[str, Any]] = json.loads(response.read())["items"]
        return items


@contextlib.contextmanager
def serving(tmp_path: Path, *args: str) -> Iterator[Served]:
    """``squadbus serve ARGS`` on a free port (memory:// bus, SQLite in a tmp data directory); stopped by PID."""
    port = free_port()
    data_dir = tmp_path / "serve-data"
    log = tmp_path / "serve.log"
    proc = spawn([*SQUADBUS, "serve", "--port", str(port), *args], log, env=clean_env(data_dir))
    try:
        wait_until(lambda: port_open(port), 60, f"squadbus serve (log {log})", proc)
        yield Served(f"http://127.0.0.1:{port}", data_dir, proc)
    finally:
        stop(proc)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """An open ``squadbus serve`` (no tokens), as ``make run`` starts it but on a free port."""
    with serving(tmp_path) as running:
        yield running


def run_cli(args: Sequence[str], env: dict[str, str], *, stdin: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``squadbus ARGS`` to completion."""
    return subprocess.run([*SQUADBUS, *args], env=env, input=stdin, capture_output=True, text=True,
                          timeout=timeout, check=False)


class LineReader:
    """Lines of a child's pipe, read by a thread so a test can wait for one with a timeout."""

    def __init__(self, pipe: IO[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self._thread.start()

    def _pump(self, pipe: IO[str]) -> None:
        for line in pipe:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next(self, timeout: float) -> str | None:
        """The next line; None at end of file; raises queue.Empty after ``timeout`` seconds."""
        return self.lines.get(timeout=timeout)

    def join(self) -> None:
        """Wait for end of file (the child has exited)."""
        self._thread.join(timeout=30)
