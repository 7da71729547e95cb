"""Imports go one way: every module imports only modules listed above it in ARCHITECTURE.md's
table (the data flow), and every module is in the table. Search and tracking sit side by
side: neither imports the other, and tracking (which `posetune train` uses) never imports Ray."""

from __future__ import annotations

import re
import subprocess
import sys

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


def source(module: str) -> str:
    return (REPO / "posetune" / f"{module}.py").read_text()


def test_search_and_tracking_sit_side_by_side():
    assert "tracking" not in posetune_imports(source("search"))
    assert not posetune_imports(source("tracking")) & {"search", "trial", "placement", "cli"}
    for module in ("tracking", "results"):
        assert not re.search(r"^\s*(import|from) ray\b", source(module), re.M), f"{module} imports Ray"


def test_training_with_tracking_does_not_import_ray():
    code = (
        "import sys\n"
        "import posetune.cli, posetune.train, posetune.tracking, posetune.results\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
