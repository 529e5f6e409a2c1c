"""The CLI with no service to talk to, and its input checks (subprocesses and CliRunner)."""

from __future__ import annotations

from pathlib import Path

from tests.cli.conftest import clean_env, closed_port_url, run_cli


def _refusal(stderr: str) -> None:
    [line] = stderr.strip().splitlines()
    assert line.startswith("squadbus: error:")
    for hint in ("memory://", "make run", "--api", "redis://"):
        assert hint in line, line


def test_send_into_an_unserved_memory_bus_is_refused(tmp_path: Path) -> None:
    result = run_cli(["--local-api", closed_port_url(), "send", "pm", "dev-1", "hi"], clean_env(tmp_path))
    assert result.returncode == 1
    assert result.stdout == ""
    _refusal(result.stderr)


def test_tail_of_an_unserved_memory_bus_is_refused(tmp_path: Path) -> None:
    result = run_cli(["--local-api", closed_port_url(), "tail"], clean_env(tmp_path), timeout=30)
    assert result.returncode == 1
    _refusal(result.stderr)


def test_an_unreachable_api_is_one_line(tmp_path: Path) -> None:
    result = run_cli(["--api", closed_port_url(), "send", "pm", "dev-1", "hi"], clean_env(tmp_path))
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("squadbus: error:") and "no squadbus service answers" in line


def test_tail_outside_agent_is_refused(tmp_path: Path) -> None:
    for pattern in ("foo.>", "agent..x"):
        result = run_cli(["--url", "memory://", "tail", pattern], clean_env(tmp_path), timeout=30)
        assert result.returncode == 2, (pattern, result.stderr)
        assert pattern in result.stderr


def test_history_does_not_create_a_store_to_read(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = run_cli(["--local-api", closed_port_url(), "history"], clean_env(data))
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert str(data / "squadbus.db") in line and "no history" in line
    assert not data.exists()


def test_history_says_which_store_it_reads(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "data")
    url = f"sqlite+aiosqlite:///{tmp_path / 'h.db'}"
    seeded = run_cli(["--url", "memory://", "history", "--store", url], env)
    assert seeded.returncode == 1
    (tmp_path / "h.db").touch()
    shown = run_cli(["--url", "redis://127.0.0.1:1/0", "history", "--store", url, "--json"], env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == ""
    assert str(tmp_path / "h.db") in shown.stderr


def test_send_reads_content_from_stdin_and_refuses_empty(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    # a broker URL that is never reached: input errors come first
    empty = run_cli(["--url", "redis://127.0.0.1:1/0", "send", "pm", "dev-1", ""], env)
    assert empty.returncode == 2
    assert "--allow-empty" in empty.stderr
    empty_stdin = run_cli(["--url", "redis://127.0.0.1:1/0", "send", "pm", "dev-1", "-"], env, stdin="")
    assert empty_stdin.returncode == 2
    assert "--allow-empty" in empty_stdin.stderr


def test_demo_prints_the_conversation_in_order(tmp_path: Path) -> None:
    result = run_cli(["--local-api", closed_port_url(), "demo"], clean_env(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    talk = [line for line in lines if line.startswith("  ")]
    first_task = next(i for i, line in enumerate(talk) if "[task]" in line)
    assert all("kick-off" not in line and "stand-up" not in line for line in talk[first_task:])
    for dev, job in (("dev-1", "build the login form"), ("dev-2", "add the session API")):
        task = talk.index(f"  pm -> {dev} [task] {job}")
        ask = talk.index(f"  {dev} -> reviewer [request] review my work on: {job}")
        answer = talk.index(f"  reviewer -> {dev} [reply] approved, ship it")
        done = talk.index(f"  {dev} -> pm [status] done: {job}")
        assert task < ask < answer < done
    assert "nothing reached a service" in result.stderr
