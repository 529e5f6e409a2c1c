"""The README's two commands on a fresh machine: installs come from the lock, `make run` needs only
`.[server]` in the project's virtual environment and leaves nothing in the checkout."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import tomllib
import uuid
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from squadbus.testing.servers.process import free_port, spawn, stop, wait_until

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "constraints.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)")


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        match = PIN.match(line)
        if match:
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = list(project["project"]["dependencies"]) + list(project["build-system"]["requires"])
    for extra in project["project"]["optional-dependencies"].values():
        names += extra
    return [Requirement(name) for name in names]


def test_lock_pins_every_requirement_to_a_version_in_its_range() -> None:
    pins = _pins()
    for requirement in _requirements():
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not pinned in {LOCK.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])
        for extra in requirement.extras:  # redis[hiredis], a2a-sdk[http-server]: what the extra adds is pinned too
            for needed in _extra_requirements(requirement.name, extra):
                assert canonicalize_name(needed.name) in pins, f"{needed} ({requirement.name}[{extra}]) is not pinned"


def _extra_requirements(distribution: str, extra: str) -> list[Requirement]:
    """The requirements the installed ``distribution`` adds for ``extra`` (from its metadata)."""
    found = []
    for line in importlib.metadata.requires(distribution) or []:
        needed = Requirement(line)
        if needed.marker is not None and needed.marker.evaluate({"extra": extra}) \
                and not needed.marker.evaluate({"extra": ""}):
            found.append(needed)
    assert found, f"{distribution} has no requirements for its extra {extra!r}"
    return found


def test_make_targets_use_the_project_venv_and_run_installs_only_the_server_extra() -> None:
    plan = subprocess.run(["make", "-n", "-B", "run", "check"], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**os.environ, "VENV": ".venv"}).stdout
    assert "scripts/install.sh --server" in plan
    assert ".venv/bin/squadbus serve" in plan
    assert ".venv/bin/python -m pytest" in plan
    script = (ROOT / "scripts" / "install.sh").read_text()
    assert "PIP_CONSTRAINT=" in script and "requirements/constraints.txt" in script


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.slow
def test_make_install_server_then_serve_from_the_checkout_leaves_no_files_in_it(tmp_path: Path) -> None:
    """What `make run` does, in a new virtual environment, serving from the repository root."""
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SQUADBUS_", "VIRTUAL_ENV", "PIP_"))}
    env |= {"VENV": str(venv), "XDG_DATA_HOME": str(tmp_path / "xdg")}
    subprocess.run(["make", "install-server"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    python = str(venv / "bin" / "python")
    extras = subprocess.run([python, "-c", "import redis"], capture_output=True, check=False)
    assert extras.returncode != 0, "install-server installed the redis extra"
    before = sorted(p.name for p in ROOT.iterdir())
    port = free_port()
    proc = spawn([str(venv / "bin" / "squadbus"), "serve", "--port", str(port)], tmp_path / "serve.log", env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _ready(base), 30, "squadbus serve", proc)
        execution = str(uuid.uuid4())
        sent = httpx.post(f"{base}/v1/messages", json={"sender_id": "pm", "recipient_id": "dev-1",
                                                        "content": "hi", "task_execution_id": execution})
        assert sent.status_code in (200, 201, 202), sent.text
        page = httpx.get(f"{base}/v1/messages", params={"task_execution_id": execution}).json()
        assert [m["content"] for m in page["items"]] == ["hi"], json.dumps(page)
    finally:
        stop(proc)
    assert sorted(p.name for p in ROOT.iterdir()) == before, "serve wrote files into the checkout"
    data = tmp_path / "xdg" / "squadbus"
    assert (data / "squadbus.db").is_file()
    assert (data / "audit.jsonl").is_file()
