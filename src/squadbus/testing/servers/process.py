"""Shared plumbing for private server processes: free ports, readiness, stop by PID."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger("squadbus.testing.servers")


class ServerUnavailable(RuntimeError):
    """A server binary is missing or the server did not become ready."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    Every socket stays bound until all ports are known, so the kernel cannot hand the same port out
    twice; separate :func:`free_port` calls can (a NATS cluster once got a route port equal to a node's
    monitor port, and its routes spoke to an HTTP server).
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def find_binary(name: str, *extra_dirs: str | Path) -> str:
    """Path of executable ``name`` on PATH, in the venv's scripts dir, or in ``extra_dirs``."""
    search = [sysconfig.get_path("scripts"), *map(str, extra_dirs)]
    for directory in search:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise ServerUnavailable(f"{name} not found; run scripts/install.sh (apt and pip installs)")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll ``check`` until true; raise ServerUnavailable after ``timeout`` or if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerUnavailable(f"{what}: process exited with code {proc.returncode}")
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(0.02)
    raise ServerUnavailable(f"{what}: not ready after {timeout}s")


def spawn(argv: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own process group with output to ``log_path``."""
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it; closed on stop
    try:
        return subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )
    finally:
        log.close()


def stop(proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Stop ``proc`` by its PID (``sig`` first, SIGKILL after ``timeout``). Idempotent."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def kill9(proc: subprocess.Popen[bytes]) -> None:
    """``kill -9`` the process (fault tests)."""
    stop(proc, sig=signal.SIGKILL)


def freeze(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP ``pid`` and return once every one of its threads is stopped (state T).

    ``os.kill`` returns before a multi-threaded process has stopped: right after it, some of
    nats-server's 8 threads were still running in 99 of 300 tries, so a request sent "to a
    stopped server" could still be answered. Resume with ``os.kill(pid, signal.SIGCONT)``.
    """
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while not all(_thread_state(stat) == "T" for stat in Path(f"/proc/{pid}/task").glob("*/stat")):
        if time.monotonic() > deadline:
            raise ServerUnavailable(f"process {pid} did not stop within {timeout:g} s of SIGSTOP")
        time.sleep(0.002)


def _thread_state(stat: Path) -> str:
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):  # a thread that ended meanwhile
        return "T"
