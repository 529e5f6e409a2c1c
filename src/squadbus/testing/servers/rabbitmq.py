"""A private RabbitMQ node for tests and benchmarks: loopback ports, its own epmd, stop by PID.

Debian's ``rabbitmq-server`` package is run from ``/usr/lib/rabbitmq/bin`` (the
``/usr/sbin`` wrapper re-runs itself as the ``rabbitmq`` user when started by
root). Everything the node reads or writes lives in one directory: the data
(``RABBITMQ_MNESIA_BASE``), logs, the Erlang cookie (``HOME``), and empty
``rabbitmq-env.conf``, ``rabbitmq.conf`` and ``enabled_plugins`` files so that
nothing under ``/etc/rabbitmq`` applies. The node gets its own ``epmd`` on a
private port (``ERL_EPMD_PORT``): epmd outlives the node, so it is started and
stopped by PID here. Ready means an AMQP handshake is answered, not just a TCP
connect.

>>> with RabbitServer(tmp_path) as server:
...     url = server.url               # amqp://guest:guest@127.0.0.1:PORT/
...     server.kill9(); server.start()  # crash and restart on the same data directory
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from squadbus.testing.servers.process import (
    ServerUnavailable,
    free_ports,
    kill9,
    port_open,
    spawn,
    stop,
    wait_until,
)

logger = logging.getLogger("squadbus.testing.servers.rabbitmq")

SERVER_SCRIPT = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL_SCRIPT = "/usr/lib/rabbitmq/bin/rabbitmqctl"
READY_TIMEOUT = 60.0
_AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


def amqp_handshake(port: int, host: str = "127.0.0.1") -> bool:
    """True when ``host:port`` answers the AMQP 0-9-1 protocol header with ``connection.start``."""
    with socket.create_connection((host, port), timeout=1.0) as sock:
        sock.sendall(_AMQP_HEADER)
        frame = sock.recv(11)
    # method frame (type 1) on channel 0, class 10 (connection) method 10 (start)
    return len(frame) >= 11 and frame[0] == 1 and frame[7:11] == b"\x00\x0a\x00\x0a"


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


class RabbitServer:
    """One private RabbitMQ node with its epmd. Use as a context manager or call start/stop.

    ``restart()`` (or ``kill9()`` then ``start()``) keeps the ports and the data
    directory, so durable queues and their messages come back.
    """

    def __init__(self, directory: str | Path | None = None, *, name: str = "squadbus") -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="squadbus-rabbitmq-")
            directory = self._tmp.name
        self.directory = Path(directory)
        self.port, self.dist_port, self.epmd_port = free_ports(3)
        self.node = f"{name}-{self.port}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``amqp://guest:guest@127.0.0.1:<port>/`` (the default vhost ``/``)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def env(self) -> dict[str, str]:
        """The environment of the node and of ``rabbitmqctl`` for it."""
        d = self.directory
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(d),  # the Erlang cookie goes here, not into root's home
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),  # .conf is appended
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_SERVER_START_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def _write_config(self) -> None:
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        (d / "rabbitmq-env.conf").write_text("")
        (d / "enabled_plugins").write_text("[].\n")
        (d / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n")

    def start(self, timeout: float = READY_TIMEOUT) -> RabbitServer:
        """Start epmd (if needed) and the node, and wait for an AMQP handshake; raises ServerUnavailable."""
        if self.running:
            return self
        if not os.access(SERVER_SCRIPT, os.X_OK) or shutil.which("epmd") is None:
            raise ServerUnavailable(f"{SERVER_SCRIPT} or epmd not found; run scripts/install.sh (apt rabbitmq-server)")
        self._write_config()
        try:
            if self.epmd is None or self.epmd.poll() is not None:
                self.epmd = spawn(
                    ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"], self.directory / "epmd.log",
                    env=self.env(),
                )
                wait_until(lambda: port_open(self.epmd_port), 10.0, f"epmd on port {self.epmd_port}", self.epmd)
            self.proc = spawn([SERVER_SCRIPT], self.directory / "node.log", env=self.env())
            wait_until(lambda: amqp_handshake(self.port), timeout, f"rabbitmq node on port {self.port}", self.proc)
        except ServerUnavailable as exc:
            tail = self.log_tail()
            self.stop_node()
            raise ServerUnavailable(f"{exc}\n{tail}") from exc
        except BaseException:  # the wait itself failed or was interrupted: never leave epmd or the node running
            self.stop()
            raise
        return self

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the node's console output, for error messages."""
        try:
            text = (self.directory / "node.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _beam_pids(self) -> list[int]:
        # The script runs the Erlang VM as its child (it traps TERM to stop it cleanly).
        return _children(self.proc.pid) if self.proc is not None else []

    def stop_node(self, timeout: float = 30.0) -> None:
        """Stop the node by PID (SIGTERM: the script stops the VM cleanly; SIGKILL after ``timeout``)."""
        if self.proc is None:
            return
        beams = self._beam_pids()
        stop(self.proc, timeout=timeout)
        for pid in beams:  # only if the VM outlived the script (SIGKILL path)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)

    def kill9(self) -> None:
        """Crash the node: ``kill -9`` the Erlang VM, then its script. epmd keeps running."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for pid in self._beam_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        kill9(self.proc)

    def restart(self, *, crash: bool = False) -> None:
        """Stop (or crash) the node and start it again on the same ports and data directory."""
        if crash:
            self.kill9()
        else:
            self.stop_node()
        self.start()

    def ctl(self, *args: str, timeout: float = 30.0) -> str:
        """Run ``rabbitmqctl -n <node> ARGS`` for this node and return its output (raises on failure)."""
        result = subprocess.run(
            [CTL_SCRIPT, "-n", self.node, *args], env=self.env(), capture_output=True, text=True,
            timeout=timeout, check=False,
        )
        if result.returncode != 0:
            raise ServerUnavailable(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def stop(self) -> None:
        """Stop the node, then its epmd, by PID. Idempotent."""
        self.stop_node()
        if self.epmd is not None:
            stop(self.epmd)

    def cleanup(self) -> None:
        """Stop everything and remove the temp dir (if this object created it)."""
        self.stop()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RabbitServer:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()
