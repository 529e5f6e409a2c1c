"""The README's example runs as printed and the README keeps its promises to newcomers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
EXAMPLE = ROOT / "examples" / "squad.py"
SECTION = "## Agents messaging each other (30 lines)\n"
EXPECTED = {
    "dev-1 got task: build the login form",
    "dev-1 got broadcast: stand-up in 5 minutes",
    "pm got: done (approved)",
    "pm got: on my way",
}


def _example() -> str:
    text = README.read_text()
    start = text.index("```python\n", text.index(SECTION)) + len("```python\n")
    return text[start:text.index("```", start)]


def run_example(url: str, timeout: float = 60) -> list[str]:
    """Run examples/squad.py against ``url``; its printed lines (fails the test on a non-zero exit)."""
    result = subprocess.run([sys.executable, str(EXAMPLE), url], capture_output=True, text=True, timeout=timeout,
                            check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_readme_example_is_examples_squad_py_and_about_thirty_lines() -> None:
    code = _example()
    assert code == EXAMPLE.read_text(), "the README's example and examples/squad.py must be the same code"
    agent_code = [line for line in code.splitlines() if line.strip() and not line.startswith(("import", "from"))]
    assert len(agent_code) <= 30


def test_example_runs_on_memory() -> None:
    lines = run_example("memory://")
    assert set(lines) == EXPECTED
    assert len(lines) == 4


def test_first_lines_give_the_two_commands_and_the_disclaimer() -> None:
    text = README.read_text()
    head = text.splitlines()[:6]
    assert any(line.startswith("make run") for line in head)
    assert any(line.startswith("make check") for line in head)
    assert "not** the AWS project named *agent-squad*" in text
