"""A private PostgreSQL cluster for tests and benchmarks (Debian ``postgresql``, no service).

``initdb`` refuses to run as root, so when we are root every PostgreSQL
command runs as the ``postgres`` user through ``runuser``; the cluster lives
in a temp dir owned by that user, listens on 127.0.0.1 and a free port, and
keeps its socket in the temp dir (not /var/run). Stop is ``pg_ctl -m fast``,
then the postmaster PID if pg_ctl fails::

    with running_postgres() as pg:
        url = pg.url            # postgresql://postgres@127.0.0.1:PORT/postgres
        pg.stop(); pg.start()   # restart keeps the data
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from squadbus.testing.servers.process import ServerUnavailable, find_binary, free_port, port_open, wait_until

logger = logging.getLogger("squadbus.testing.servers.postgres")

FAST_OPTIONS = ("-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")
"""Server options for speed-only runs (never for durability tests; say so beside any number)."""


def _pg_bin(name: str) -> str:
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name), reverse=True)
    return find_binary(name, *dirs) if dirs else find_binary(name)


class PostgresServer:
    """One private cluster: ``init()`` once, then ``start()`` / ``stop()`` any number of times."""

    def __init__(self, base: Path, *, port: int | None = None, options: Sequence[str] = ()) -> None:
        self.base = base
        self.data = base / "data"
        self.log = base / "postgres.log"
        self.port = port or free_port()
        self.options = tuple(options)
        self._as_root = os.geteuid() == 0

    @property
    def url(self) -> str:
        """Superuser URL of the default database."""
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        """Superuser URL of ``database`` on this cluster."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, argv: Sequence[str], timeout: float = 60.0) -> None:
        if self._as_root:
            argv = [find_binary("runuser"), "-u", "postgres", "--", *argv]
        try:
            subprocess.run(
                list(argv), check=True, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=self.base
            )
        except subprocess.CalledProcessError as exc:
            output = (exc.stderr or exc.stdout or b"").decode(errors="replace").strip()
            raise ServerUnavailable(f"{Path(argv[0]).name} failed ({exc.returncode}): {output[-2000:]}") from exc
        except subprocess.TimeoutExpired as exc:
            raise ServerUnavailable(f"{argv[0]} did not finish in {timeout}s") from exc

    def init(self) -> None:
        """Create the cluster (trust auth, superuser ``postgres``)."""
        initdb = _pg_bin("initdb")
        if self._as_root:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise ServerUnavailable("running as root needs the 'postgres' user (apt install postgresql)") from exc
            os.chown(self.base, user.pw_uid, user.pw_gid)
        self.base.chmod(0o700)
        self._run([initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])

    def start(self) -> None:
        """Start the server and wait until it accepts connections; a start that fails in any way stops it again."""
        server_options = " ".join(
            ["-p", str(self.port), "-k", str(self.base), "-c", "listen_addresses=127.0.0.1", *self.options]
        )
        try:
            self._run([_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30",
                       "-o", server_options, "start"])
            wait_until(lambda: port_open(self.port), 10.0, "postgres")
        except BaseException:  # pg_ctl gave up or was interrupted, or the wait failed: never leave it running
            self.stop()
            raise

    def pid(self) -> int | None:
        """The postmaster PID, or None when it is not running."""
        try:
            first = (self.data / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """Fast shutdown (``pg_ctl -m fast``); SIGKILL by PID if that fails. Idempotent."""
        pid = self.pid()
        if pid is None:
            return
        try:
            self._run([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop"])
        except ServerUnavailable:
            logger.warning("pg_ctl stop failed; killing postmaster %d", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and port_open(self.port):
                time.sleep(0.05)


@contextlib.contextmanager
def running_postgres(*, options: Sequence[str] = ()) -> Iterator[PostgresServer]:
    """A started private cluster in a temp dir; stopped and removed on exit."""
    base = Path(tempfile.mkdtemp(prefix="squadbus-pg-"))
    server = PostgresServer(base, options=options)
    try:
        server.init()
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)
