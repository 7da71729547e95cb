"""Imports go one way: every module imports only modules listed above it in ARCHITECTURE.md's
table (the data flow), and every module is in the table."""

from __future__ import annotations

import re

from search_helpers import REPO


def documented_order() -> list[str]:
    order = []
    for line in (REPO / "ARCHITECTURE.md").read_text().splitlines():
        if line.startswith("| `"):
            order += re.findall(r"`(\w+)`", line.split("|")[1])
    return order


def posetune_imports(source: str) -> set[str]:
    """Modules of posetune a file imports, lazily (inside functions) or not."""
    found = set(re.findall(r"^\s*from posetune\.(\w+) import", source, re.M))
    for names in re.findall(r"^\s*from posetune import ([\w, ]+)", source, re.M):
        found |= {name.strip() for name in names.split(",")}
    return found


def test_every_module_imports_only_modules_above_it():
    order = documented_order()
    position = {module: i for i, module in enumerate(order)}
    modules = sorted(p.stem for p in (REPO / "posetune").glob("*.py") if not p.stem.startswith("__"))
    assert sorted(order) == modules, "ARCHITECTURE.md's table and posetune/ list different modules"
    upward = [
        f"{module} imports {imported}"
        for module in modules
        for imported in posetune_imports((REPO / "posetune" / f"{module}.py").read_text())
        if imported in position and position[imported] > position[module]
    ]
    assert not upward, f"imports against the data flow: {upward}"
