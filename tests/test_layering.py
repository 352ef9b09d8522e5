"""Imports flow one way: schedules/ and sim/ never need torch or the runtime."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "conveyor"

# package -> packages it must never import
FORBIDDEN = {
    "schedules": {"torch", "conveyor.runtime", "conveyor.train", "conveyor.sim", "conveyor.models"},
    "sim": {"conveyor.runtime", "conveyor.train"},
    "plan": {"conveyor.runtime", "conveyor.train", "conveyor.cli", "conveyor.commands"},
    "runtime": {"conveyor.train", "conveyor.cli"},
    "models": {"conveyor.runtime", "conveyor.train", "conveyor.schedules"},
    "parallel": {"conveyor.train", "conveyor.cli"},
    "generation": {"conveyor.runtime", "conveyor.train", "conveyor.cli", "conveyor.commands"},
    "data": {"conveyor.runtime", "conveyor.train", "conveyor.models", "conveyor.cli"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    pkg = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package: str) -> None:
    for path in sorted((SRC / package).rglob("*.py")):
        for name in _imports(path):
            for banned in FORBIDDEN[package]:
                assert not (name == banned or name.startswith(banned + ".")), (
                    f"{path.relative_to(SRC)} imports {name}; {package}/ must not depend on {banned}"
                )


def test_schedules_import_without_torch() -> None:
    code = "import sys, conveyor.schedules; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("package", ["schedules", "sim", "plan"])
def test_no_runtime_by_name(package: str) -> None:
    """A module looked up by name is an import the rule above cannot see: none here."""
    for path in sorted((SRC / package).rglob("*.py")):
        text = path.read_text()
        assert "import_module(" not in text and "__import__(" not in text, path
