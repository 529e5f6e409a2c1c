"""The house is layered: nothing imports a layer above it (checked on the source, not at run time)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "squadbus"

# layer -> squadbus sub-packages it may import
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "backends": {"core"},
    "store": {"core", "store"},
    "workers": {"core", "store", "workers"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name == "squadbus" or name.startswith("squadbus.")}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files or layer in {"store", "workers"}, f"no files in {layer}"
    for path in files:
        for module in _imports(path):
            parts = module.split(".")
            assert len(parts) > 1, f"{path} imports the top-level package"
            target = parts[1]
            if layer == "backends":
                own_backend = path.relative_to(PACKAGE / "backends").parts[0].removesuffix(".py")
                if target == "backends" and len(parts) > 2 and parts[2] == own_backend:
                    continue
            assert target in ALLOWED[layer], f"{path.relative_to(PACKAGE)} imports {module}"


def test_only_settings_reads_the_environment() -> None:
    for path in PACKAGE.rglob("*.py"):
        if "testing" in path.parts or "benchmarks" in path.parts:
            continue
        text = path.read_text()
        if "os.environ" in text or "os.getenv" in text:
            assert path.name == "settings.py", f"{path.relative_to(PACKAGE)} reads the environment"
