"""Imports go one way, along the data flow ARCHITECTURE.md draws: a layer imports only layers
before it in LAYERS (and itself). Search and tracking sit side by side: search never imports
tracking, and tracking (which `posetune train` uses) never imports Ray; nothing under train/
imports Ray or MLflow, so one training process is plain PyTorch."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

PACKAGE = REPO / "posetune"
# The order of the layers: a top-level module or a subpackage of posetune.
LAYERS = [
    ("errors", "choices", "internals", "tables"),
    ("storage",),
    ("config",),
    ("data",),
    ("train",),
    ("cluster",),
    ("search",),
    ("tracking",),
    ("cli", "__init__", "__main__"),
]
RANK = {layer: i for i, group in enumerate(LAYERS) for layer in group}


def layer_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_layers(source: str) -> set[str]:
    """posetune's layers a file imports, lazily (inside functions) or not."""
    found = set(re.findall(r"^\s*from posetune\.(\w+)[\w.]* import", source, re.M))
    found |= set(re.findall(r"^\s*import posetune\.(\w+)", source, re.M))
    for names in re.findall(r"^\s*from posetune import ([\w, ]+)", source, re.M):
        found |= {name.strip() for name in names.split(",")}
    return found


def python_files(layer: str | None = None) -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    return [p for p in files if layer is None or layer_of(p) == layer]


def test_every_module_belongs_to_a_layer():
    assert sorted({layer_of(p) for p in python_files()}) == sorted(RANK)


def test_every_module_imports_only_layers_before_it():
    upward = [
        f"{path.relative_to(REPO)} imports posetune.{imported}"
        for path in python_files()
        for imported in imported_layers(path.read_text())
        if RANK[imported] > RANK[layer_of(path)]
    ]
    assert not upward, f"imports against the data flow: {upward}"


def test_architecture_md_names_every_layer_in_order():
    text = (REPO / "ARCHITECTURE.md").read_text()
    positions = [text.find(f"`{layer}/`") for group in LAYERS[1:-1] for layer in group if (PACKAGE / layer).is_dir()]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), positions


@pytest.mark.parametrize(("layer", "forbidden"), [("search", "tracking"), ("train", "cluster"), ("train", "search")])
def test_side_by_side_layers_do_not_import_each_other(layer, forbidden):
    offenders = [p.name for p in python_files(layer) if forbidden in imported_layers(p.read_text())]
    assert not offenders, f"{layer}/ imports {forbidden}: {offenders}"


@pytest.mark.parametrize(("layer", "library"), [("train", "ray"), ("train", "mlflow"), ("tracking", "ray")])
def test_layers_that_stay_free_of_a_library(layer, library):
    pattern = rf"^\s*(import|from) {library}\b"
    offenders = [p.name for p in python_files(layer) if re.search(pattern, p.read_text(), re.M)]
    assert not offenders, f"{layer}/ imports {library}: {offenders}"


def test_training_with_tracking_does_not_import_ray():
    code = (
        "import sys\n"
        "import posetune.cli, posetune.train.loop, posetune.tracking.runs, posetune.search.results\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
