"""Fixtures of the browser tests: headless Debian Chromium driven by Selenium, a real ``squadbus serve``.

Selenium runs offline: the Debian chromedriver is passed as the Service's
executable and the Debian chromium as the binary, so Selenium Manager never
looks anything up or downloads a driver. Without chromium or chromedriver the
tests fail (``ServerUnavailable``), as tests needing a server do: install them
with ``scripts/install.sh`` (apt packages ``chromium`` and ``chromium-driver``).

The service runs on a private nats-server (so the test process can run a
consumer group on the same bus, one that dead-letters), with a SQLite store in
the test's tmp dir, and tokens for an agent, a viewer and an admin. Screenshots
are saved in the test's tmp dir; with ``SQUADBUS_SCREENSHOTS=<dir>`` they are also
written there (how ``docs/images`` is refreshed).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from squadbus.core.bus import Bus
from squadbus.testing.servers.nats import NatsServer
from squadbus.testing.servers.process import ServerUnavailable, free_port, port_open, spawn, stop, wait_until

WAIT = 30.0
"""Seconds an explicit wait may take (generous: the machine is shared)."""

TOKENS = {
    "pm": {"token": "browser-agent-pm", "role": "agent", "agent_id": "pm"},
    "viewer": {"token": "browser-viewer-1", "role": "viewer", "name": "board"},
    "admin": {"token": "browser-admin-1", "role": "admin", "name": "ops"},
}
T = TypeVar("T")


def chromium_paths() -> tuple[str, str]:
    """The Debian chromium and chromedriver; ServerUnavailable (a failure, never a skip) when missing."""
    browser = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        raise ServerUnavailable("the browser tests need Debian's chromium and chromium-driver "
                                "(scripts/install.sh installs them)")
    return browser, driver


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    """A headless Chromium at laptop size (1366x900), closed after the test."""
    binary, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1366,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


@pytest.fixture(scope="module")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A private nats-server for the module's tests."""
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


class Served:
    """``squadbus serve`` as a child process on a fixed port, restartable on the same store; stopped by PID."""

    def __init__(self, directory: Path, bus_url: str) -> None:
        self.directory = directory
        self.port = free_port()
        self.bus_url = bus_url
        self.tokens = directory / "tokens.json"
        self.tokens.write_text(json.dumps({"tokens": list(TOKENS.values())}))
        self.audit = directory / "audit.jsonl"
        self.log = directory / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start and wait until ``/readyz`` says ready."""
        argv = [sys.executable, "-m", "squadbus", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--url", self.bus_url, "--store", f"sqlite+aiosqlite:///{self.directory / 'history.db'}",
                "--tokens-file", str(self.tokens), "--audit-path", str(self.audit), "--log-level", "warning"]
        env = {**os.environ, "SQUADBUS_DATA_DIR": str(self.directory)}
        self.proc = spawn(argv, self.log, env=env)
        try:
            wait_until(lambda: port_open(self.port) and self._ready(), WAIT, f"squadbus serve (log {self.log})",
                       self.proc)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM (then SIGKILL) by PID."""
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def api(self, who: str) -> httpx.Client:
        """An HTTP client with ``who``'s token."""
        return httpx.Client(base_url=self.url, timeout=WAIT,
                            headers={"Authorization": f"Bearer {TOKENS[who]['token']}"})

    def cli_send(self, *args: str) -> str:
        """``squadbus --api <url> send ARGS`` with the pm agent's token; returns its output."""
        env = {**os.environ, "SQUADBUS_TOKEN": TOKENS["pm"]["token"]}
        env.pop("SQUADBUS_API", None)
        done = subprocess.run([sys.executable, "-m", "squadbus", "--api", self.url, "send", *args],
                              env=env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout


@pytest.fixture
def served(tmp_path: Path, nats: NatsServer) -> Iterator[Served]:
    """A running ``squadbus serve`` on the module's nats-server (its own streams' names are shared: each test
    uses its own executions and groups) with a fresh SQLite store."""
    server = Served(tmp_path, nats.url)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Loop:
    """An asyncio loop in a thread, for the bus work a synchronous Selenium test does beside the browser."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = WAIT) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def loop() -> Iterator[Loop]:
    """A background event loop, stopped after the test."""
    running = Loop()
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def bus(loop: Loop, nats: NatsServer) -> Iterator[Bus]:
    """A Bus of the test process on the same nats-server as the service."""
    the_bus = loop.run(Bus.from_url(nats.url).start())
    try:
        yield the_bus
    finally:
        loop.run(the_bus.close())


# ---- page helpers ------------------------------------------------------------------------------------


class Page:
    """The dashboard in the browser: open a view, wait for what it shows, take screenshots."""

    def __init__(self, driver: webdriver.Chrome, base: str, shots: Path) -> None:
        self.driver = driver
        self.base = base
        self.shots = shots
        self.extra = Path(os.environ["SQUADBUS_SCREENSHOTS"]) if os.environ.get("SQUADBUS_SCREENSHOTS") else None

    def open(self, hash_path: str) -> None:
        """Load the page at ``#<hash_path>``."""
        self.driver.get(f"{self.base}/#{hash_path}")

    def use_token(self, who: str) -> None:
        """Keep ``who``'s token in the tab (as the token form does) and reload."""
        self.driver.execute_script("sessionStorage.setItem('squadbus.token', arguments[0]);", TOKENS[who]["token"])
        self.driver.refresh()

    def until(self, what: Callable[[webdriver.Chrome], T], message: str) -> T:
        """Wait (explicitly, up to WAIT seconds) until ``what`` returns something true."""
        def check(driver: webdriver.Chrome) -> T:
            try:
                return what(driver)
            except StaleElementReferenceException:
                return False  # type: ignore[return-value]  # re-rendered meanwhile: ask again
        return WebDriverWait(self.driver, WAIT, poll_frequency=0.1).until(check, message)

    def element(self, css: str) -> WebElement:
        """The first element matching ``css`` once there is one."""
        found: WebElement = self.until(lambda d: d.find_elements(By.CSS_SELECTOR, css)[0]
                                       if d.find_elements(By.CSS_SELECTOR, css) else None, f"no element {css}")
        return found

    def text_of(self, css: str, containing: str) -> WebElement:
        """The first element matching ``css`` whose text contains ``containing``, once there is one."""
        def find(d: webdriver.Chrome) -> WebElement | None:
            for el in d.find_elements(By.CSS_SELECTOR, css):
                if containing in el.text:
                    return el
            return None
        found: WebElement = self.until(find, f"no {css} containing {containing!r}")
        return found

    def texts(self, css: str) -> list[str]:
        """The texts of every element matching ``css`` now."""
        return [el.text for el in self.driver.find_elements(By.CSS_SELECTOR, css)]

    def screenshot(self, name: str) -> Path:
        """Save the viewport as ``<name>.png`` in the test's tmp dir (and SQUADBUS_SCREENSHOTS)."""
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        assert self.driver.save_screenshot(str(path)), name
        if self.extra is not None:
            self.extra.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, self.extra / f"{name}.png")
        return path


@pytest.fixture
def page(browser: webdriver.Chrome, served: Served, tmp_path: Path) -> Page:
    """The dashboard of the served squadbus in the browser (no token yet)."""
    return Page(browser, served.url, tmp_path / "screenshots")
