"""The package layout is the architecture: each layer of ``src/prsgd`` imports only from the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "prsgd"

LAYERS = {
    "errors": 0,
    "algorithm": 1,
    "data": 1,
    "models": 1,
    "engines": 2,
    "integrations": 3,
    "training": 3,
    "experiments": 4,
    "planning": 4,
}
"""Where each part of prsgd sits; a module may import from its own part and from parts of a lower number. What is
not listed (the public API, the CLI, ``__main__`` and the thin modules at public paths) sits on top."""

TOP = 5


def part(module: str) -> str:
    """``prsgd.training.config`` -> ``training``; ``prsgd.cli`` -> ``cli``."""
    return module.split(".")[1] if module.count(".") else ""


def level(name: str) -> int:
    return LAYERS.get(name, TOP)


def imports(path: Path) -> list[str]:
    """The prsgd modules ``path`` imports, anywhere in it (deferred imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prsgd"):
            found += [f"{node.module}.{alias.name}" if node.module == "prsgd" else node.module for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("prsgd")]
    return found


def test_each_layer_imports_only_from_layers_below_it():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        module = ".".join(("prsgd", *path.relative_to(SRC).with_suffix("").parts))
        here = part(module) if path.parent != SRC else path.stem
        for imported in imports(path):
            there = part(imported)
            if there != here and level(there) >= level(here) and level(here) != TOP:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_the_top_holds_only_the_public_api_the_cli_and_main():
    top = sorted(p.stem for p in SRC.glob("*.py"))
    assert len(top) <= 8, top
    assert set(top) <= {"__init__", "__main__", "cli", "errors", "lightning", "accelerate", "train"}, top


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
