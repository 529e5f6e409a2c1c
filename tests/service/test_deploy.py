"""deploy/: the compose files parse and say what squadbus needs; commands in them parse with our CLI."""

from __future__ import annotations

import os
import subprocess
import sysconfig
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from squadbus.cli.serve import serve
from squadbus.cli.worker import worker
from squadbus.testing.servers.process import find_binary

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MINE = ["redis/docker-compose.yml", "nats/docker-compose.yml", "postgres/docker-compose.yml",
        "squadbus/docker-compose.yml"]


def load(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / name).read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), name
    return doc


@pytest.mark.parametrize("name", MINE)
def test_compose_files_parse(name: str) -> None:
    doc = load(name)
    for service in doc["services"].values():
        assert "image" in service
        for port in service.get("ports", []):
            assert isinstance(port, str)


def test_redis_uses_aof() -> None:
    command = load("redis/docker-compose.yml")["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "noeviction" in command


def test_nats_is_a_three_node_jetstream_cluster() -> None:
    services = load("nats/docker-compose.yml")["services"]
    assert sorted(services) == ["nats-1", "nats-2", "nats-3"]
    conf = (DEPLOY / "nats" / "nats.conf").read_text()
    assert "jetstream" in conf and "sync_interval: always" in conf
    for name in services:
        assert f"nats-route://{name}:6222" in conf
    binary = find_binary("nats-server", sysconfig.get_path("scripts"))
    result = subprocess.run([binary, "-c", str(DEPLOY / "nats" / "nats.conf"), "-t"], capture_output=True,
                            text=True, env={**os.environ, "NATS_NAME": "nats-1"}, timeout=30, check=False)
    assert result.returncode == 0, result.stderr + result.stdout


def test_postgres_has_no_default_password() -> None:
    pg = load("postgres/docker-compose.yml")["services"]["postgres"]
    assert pg["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert "healthcheck" in pg


def test_squadbus_stack_commands_parse() -> None:
    doc = load("squadbus/docker-compose.yml")
    for included in doc["include"]:
        assert (DEPLOY / "squadbus" / included).resolve().exists(), included
    services = doc["services"]
    assert {"serve", "db-writer", "audit-logger"} <= set(services)
    for service in services.values():
        command = service["command"]
        assert command[0] == "squadbus"
        cmd = {"serve": serve, "worker": worker}[command[1]]
        cmd.make_context(command[1], list(command[2:]))  # raises on an unknown option or worker name
    env = services["serve"]["environment"]
    assert env["SQUADBUS_TOKENS_FILE"].startswith("/run/secrets/")
    assert (DEPLOY / "squadbus" / "tokens.example.json").exists()


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.split()[0] for line in text.splitlines() if line and not line.startswith("#")
             and not line.startswith(" ")]
    assert lines[0] == "FROM"
    assert "USER" in lines and "EXPOSE" in lines and "CMD" in lines
    extras = text.split('pip install ".[')[1].split("]")[0].split(",")
    pyproject = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
    assert set(extras) <= set(pyproject["project"]["optional-dependencies"])
