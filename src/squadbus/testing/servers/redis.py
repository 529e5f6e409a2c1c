"""A private redis-server for tests and benchmarks: free loopback port, temp dir, stop by PID.

Two profiles: ``fast`` (no persistence at all) and ``durable`` (``appendonly
yes`` + ``appendfsync always``). ``restart()`` starts it again on the same
port and directory (the durable profile reloads its AOF); ``kill9()`` is a
crash.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from squadbus.testing.servers.process import (
    find_binary,
    free_port,
    kill9,
    spawn,
    stop,
    wait_until,
)

PROFILES = ("fast", "durable")


def _ping(port: int) -> bool:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


class RedisServer:
    """One private redis-server process. Use as a context manager or call start/stop."""

    def __init__(self, profile: str = "fast", *, directory: str | Path | None = None, port: int | None = None) -> None:
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}")
        self.profile = profile
        self.binary = find_binary("redis-server")
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="squadbus-redis-")
            directory = self._tmp.name
        self.directory = Path(directory)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0`` (add ``?profile=durable`` yourself for the durable profile)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.profile == "durable"
            else ["--appendonly", "no"]
        )
        return [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
            "--dir", str(self.directory), "--daemonize", "no", "--protected-mode", "no",
            "--maxclients", "4000",
        ]

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait for PONG; raises ServerUnavailable."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = spawn(self.argv(), self.directory / "redis.log")
        try:
            wait_until(lambda: _ping(self.port), timeout, f"redis-server on port {self.port}", self.proc)
        except BaseException:  # not ready, or the wait itself failed or was interrupted: never leave it running
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop by PID (SIGTERM, then SIGKILL). Idempotent."""
        if self.proc is not None:
            stop(self.proc)

    def kill9(self) -> None:
        """Crash the server (``kill -9``)."""
        if self.proc is not None:
            kill9(self.proc)

    def restart(self, *, crash: bool = False, down_for: float = 0.0) -> None:
        """Stop (or crash) and start again on the same port and directory."""
        if crash:
            self.kill9()
        else:
            self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    def cleanup(self) -> None:
        """Stop and remove the temp dir (if this object created it)."""
        self.stop()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()
