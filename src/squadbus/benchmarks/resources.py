"""CPU and memory of the bench client and of the broker over one line of ``squadbus bench``.

* **Client**: this process (both sides of the comparison run in it, one after
  the other). CPU is ``time.process_time()`` (every thread, nanoseconds); RSS
  is read from ``/proc/self/statm``.
* **Broker**: the process listening on the URL's port when the URL names this
  machine, found through ``/proc/net/tcp{,6}`` (the listening socket's inode)
  and ``/proc/*/fd`` (who holds it), or given by ``--broker-pid``. CPU is the
  sum of its threads' ``/proc/PID/task/*/schedstat`` run time (nanoseconds),
  or ``/proc/PID/stat``'s utime + stime (clock ticks, but counting threads
  that ended during the line) when schedstat is missing or threads ended;
  RSS from ``/proc/PID/statm``. A remote broker, or one no
  process here can be found for, is reported as n/a with the reason.

RSS is sampled every :data:`SAMPLE_EVERY` seconds during the line (and at its
start and end): the peak is the highest sample. psutil would do the same
reads; it is not a dependency of squadbus, and the reads are Linux only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import ipaddress
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from squadbus.core.tasks import cancel_and_wait

SAMPLE_EVERY = 0.1
"""Seconds between two RSS samples of client and broker during a line."""
DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "nats": 4222, "tls": 4222, "kafka": 9092, "amqp": 5672,
                 "amqps": 5671}
PROC = Path("/proc")
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column
_MIB = 1024 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class Process:
    """A process to measure, or why there is none: ``pid`` None and ``reason`` one line."""

    pid: int | None
    name: str | None = None
    found_by: str | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "name": self.name, "found_by": self.found_by, "reason": self.reason}

    def line(self) -> str:
        if self.pid is None:
            return f"n/a: {self.reason}"
        return f"{self.name}[{self.pid}] ({self.found_by})"


def broker_process(url: str, pid: int | None = None, *, proc: Path = PROC) -> Process:
    """The broker process of ``url`` on this machine, or a :class:`Process` saying why not (never raises)."""
    if pid is not None:
        name = _name(proc, pid)
        if name is None:
            return Process(None, reason=f"--broker-pid {pid}: no such process")
        return Process(pid, name, "--broker-pid")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        return Process(None, reason="memory:// runs inside the client process: its CPU and memory are the client's")
    if not (proc / "net" / "tcp").exists():
        return Process(None, reason=f"no {proc}/net/tcp here (Linux only): pass --broker-pid")
    host, port = _first_address(parts.netloc, DEFAULT_PORTS.get(scheme))
    if port is None:
        return Process(None, reason=f"no port in {scheme}:// URL and no default for it: pass --broker-pid")
    try:
        addresses = {ipaddress.ip_address(str(info[4][0]).split("%")[0])
                     for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except (OSError, ValueError) as exc:
        return Process(None, reason=f"{host} does not resolve ({exc})")
    local = {a for a in addresses if _is_local(a)}
    if not local:
        shown = ", ".join(sorted(map(str, addresses)))
        return Process(None, reason=f"{host} ({shown}) is not an address of this machine: a remote broker")
    inodes = _listeners(proc, port, local)
    if not inodes:
        return Process(None, reason=f"no process on this machine listens on {host}:{port}")
    owners = _owners(proc, inodes)
    if not owners:
        return Process(None, reason=f"the listener on {host}:{port} belongs to no process readable here: "
                                    "pass --broker-pid")
    owner = min(owners)  # forked servers share the socket: the parent has the lowest pid
    if owner == os.getpid():
        return Process(None, reason="the broker runs inside the client process: its CPU and memory are the client's")
    return Process(owner, _name(proc, owner), f"listens on {host}:{port}")


def _first_address(netloc: str, default_port: int | None) -> tuple[str, int | None]:
    """Host and port of a URL's first server (``nats://a:1,b:2`` names several)."""
    first = netloc.rpartition("@")[2].split(",")[0]
    if first.startswith("["):
        host, _, rest = first[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = first.partition(":")
    return unquote(host) or "localhost", int(port_text) if port_text.isdigit() else default_port


def _is_local(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True when ``address`` is one of this machine's (binding to it succeeds)."""
    if address.is_loopback:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


def _listeners(proc: Path, port: int, local: set[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> set[str]:
    """Inodes of the listening TCP sockets on ``port`` bound to one of ``local`` or to every address."""
    inodes: set[str] = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        try:
            rows = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            address_hex, _, port_hex = fields[1].partition(":")
            if int(port_hex, 16) != port or len(address_hex) != width:
                continue
            bound = _address(address_hex)
            if bound.is_unspecified or bound in local or _mapped(bound) in local:
                inodes.add(fields[9])
    return inodes


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} prints it: 32-bit words in the host's byte order."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)) if sys.byteorder == "little" else raw
    return ipaddress.ip_address(words)


def _mapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    return address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None


def _owners(proc: Path, inodes: set[str]) -> set[int]:
    """Pids holding one of the sockets ``inodes`` open."""
    wanted = {f"socket:[{inode}]" for inode in inodes}
    owners: set[int] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(fd) in wanted:
                    owners.add(int(entry.name))
                    break
    return owners


def _name(proc: Path, pid: int) -> str | None:
    try:
        return (proc / str(pid) / "comm").read_text().strip()
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class CpuReading:
    """Two views of a process's CPU seconds so far: its live threads' schedstat run time (nanoseconds;
    None without schedstat) and ``/proc/PID/stat``'s utime + stime (clock ticks, but counting threads
    that have ended too)."""

    threads: float | None
    ticks: float

    def since(self, earlier: CpuReading) -> float:
        """CPU seconds between ``earlier`` and this reading: the precise thread sum, unless threads
        ended in between (the two views then disagree by more than a few ticks)."""
        by_ticks = self.ticks - earlier.ticks
        if self.threads is None or earlier.threads is None:
            return by_ticks
        by_threads = self.threads - earlier.threads
        return by_threads if abs(by_threads - by_ticks) <= 3 / _TICKS else by_ticks


def cpu_reading(pid: int, *, proc: Path = PROC) -> CpuReading:
    """The CPU ``pid`` has used so far; raises OSError when it is gone."""
    total = 0
    found = False
    for task in (proc / str(pid) / "task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[0])
            found = True
    fields = (proc / str(pid) / "stat").read_text().rpartition(")")[2].split()
    ticks = (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14 and 15 of stat)
    return CpuReading(total / 1e9 if found else None, ticks)


def rss_bytes(pid: int | None = None, *, proc: Path = PROC) -> int:
    """Resident memory of ``pid`` (None: this process) in bytes; raises OSError when unreadable."""
    path = proc / ("self" if pid is None else str(pid)) / "statm"
    return int(path.read_text().split()[1]) * _PAGE


def release_memory() -> None:
    """Give what earlier lines freed back to the OS, so this line's RSS is its own: collect cycles, then
    glibc's ``malloc_trim(0)`` (1 KiB contents live in malloc's heap, which keeps freed pages otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


@dataclass(slots=True)
class Usage:
    """What one process used over a line: CPU seconds and RSS (bytes), or the reason there is no figure."""

    process: Process
    cpu_s: float | None = None
    rss_start: int | None = None
    rss_peak: int | None = None
    rss_end: int | None = None

    def as_dict(self, wall_s: float, messages: int) -> dict[str, Any]:
        cpu = self.cpu_s
        return {
            **self.process.as_dict(),
            "cpu_s": None if cpu is None else round(cpu, 4),
            "cpu_pct": None if cpu is None or wall_s <= 0 else round(100 * cpu / wall_s, 1),
            "cpu_us_per_msg": None if cpu is None or messages <= 0 else round(cpu * 1e6 / messages, 2),
            "rss_mib_start": None if self.rss_start is None else round(self.rss_start / _MIB, 1),
            "rss_mib_peak": None if self.rss_peak is None else round(self.rss_peak / _MIB, 1),
            "rss_mib_end": None if self.rss_end is None else round(self.rss_end / _MIB, 1),
        }

    def line(self, wall_s: float, messages: int) -> str:
        figures = self.as_dict(wall_s, messages)
        if figures["cpu_s"] is None:
            return f"n/a: {self.process.reason}"
        rss = ("RSS n/a" if figures["rss_mib_peak"] is None
               else f"RSS {figures['rss_mib_end']:.0f} MiB end, {figures['rss_mib_peak']:.0f} peak")
        per = "-" if figures["cpu_us_per_msg"] is None else f"{figures['cpu_us_per_msg']:.1f}"
        return f"{figures['cpu_pct']:.0f}% of a core, {per} us/msg, {rss}"


@dataclass(slots=True)
class Resources:
    """Client and broker usage over ``wall_s`` seconds of one line that moved ``messages`` messages."""

    wall_s: float
    messages: int
    client: Usage
    broker: Usage

    def as_dict(self) -> dict[str, Any]:
        return {"wall_s": round(self.wall_s, 4), "messages": self.messages, "rss_sampled_every_s": SAMPLE_EVERY,
                "client": self.client.as_dict(self.wall_s, self.messages),
                "broker": self.broker.as_dict(self.wall_s, self.messages)}

    def line(self) -> str:
        broker = self.broker.process
        who = f"broker {broker.name}[{broker.pid}]" if broker.pid is not None else "broker"
        return (f"client {self.client.line(self.wall_s, self.messages)}; "
                f"{who} {self.broker.line(self.wall_s, self.messages)} (over {self.wall_s:.2f} s)")


class Meter:
    """Measures client and broker from :meth:`start` to :meth:`stop`, sampling RSS in a task meanwhile."""

    def __init__(self, broker: Process, *, every: float = SAMPLE_EVERY, proc: Path = PROC) -> None:
        self.broker = broker
        self.every = every
        self.proc = proc
        self._t0 = 0.0
        self._cpu0 = 0.0
        self._broker_cpu0: CpuReading | None = None
        self._peaks: dict[str, int | None] = {}
        self._starts: dict[str, int | None] = {}
        self._lost: str | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Take the first snapshot and start sampling (call inside the event loop)."""
        self._peaks = {"client": None, "broker": None}
        self._lost = None
        release_memory()
        self._t0 = time.perf_counter()
        self._cpu0 = time.process_time()
        self._broker_cpu0 = self._broker_cpu()
        self._sample()
        self._starts = dict(self._peaks)
        self._task = asyncio.create_task(self._sampler())

    async def cancel(self) -> None:
        """Stop sampling without a result (the line failed); the sampler has ended when it returns. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)

    async def stop(self, messages: int) -> Resources:
        """The last snapshot: usage from :meth:`start` until now, for ``messages`` messages moved."""
        wall = time.perf_counter() - self._t0
        cpu = time.process_time() - self._cpu0
        broker_cpu = self._broker_cpu()
        task, self._task = self._task, None
        await cancel_and_wait(task)
        self._sample()
        client_end = self._rss(None)
        client = Usage(Process(os.getpid(), _name(self.proc, os.getpid()) or "python", "this process"), cpu,
                       self._starts.get("client"), self._peaks["client"], client_end)
        if self.broker.pid is None:
            broker = Usage(self.broker)
        elif self._lost is not None or broker_cpu is None or self._broker_cpu0 is None:
            gone = self._lost or f"process {self.broker.pid} could not be read"
            broker = Usage(Process(self.broker.pid, self.broker.name, self.broker.found_by, gone))
        else:
            broker = Usage(self.broker, broker_cpu.since(self._broker_cpu0), self._starts.get("broker"),
                           self._peaks["broker"], self._rss(self.broker.pid))
        return Resources(wall, messages, client, broker)

    def _broker_cpu(self) -> CpuReading | None:
        if self.broker.pid is None:
            return None
        try:
            return cpu_reading(self.broker.pid, proc=self.proc)
        except OSError as exc:
            self._lost = f"process {self.broker.pid} could not be read during the line ({exc.strerror or exc})"
            return None

    def _rss(self, pid: int | None) -> int | None:
        try:
            return rss_bytes(pid, proc=self.proc)
        except OSError:
            return None

    def _sample(self) -> None:
        for key, pid in (("client", None), ("broker", self.broker.pid)):
            if key == "broker" and pid is None:
                continue
            rss = self._rss(pid)
            if rss is None:
                if key == "broker":
                    self._lost = f"process {pid} could not be read during the line"
                continue
            peak = self._peaks[key]
            self._peaks[key] = rss if peak is None else max(peak, rss)

    async def _sampler(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            self._sample()
