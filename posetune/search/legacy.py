"""Module paths of posetune's flat layout (before the subpackages), for saved searches.

Tune pickles some of posetune's objects into an experiment folder: the searcher's state (a
``BudgetAwareOptunaSearch`` over a ``DefineByRun`` space) and the saved Tuner (its search
algorithm, scheduler and callbacks). A search started with the flat layout names their classes
``posetune.searchers.BudgetAwareOptunaSearch``, ``posetune.space.SearchSpace`` and so on;
unpickling them needs those module names to import. ``alias_flat_layout`` registers each old
name as the module that now holds the code, before Tune restores a saved search (Tune unpickles
it itself); ``loads`` reads one such pickle here, importing only the modules it names.
Old names that are packages now (``posetune.search``, ``posetune.tracking``, ...) resolve their
attributes through those packages' own ``__getattr__``.
"""

from __future__ import annotations

import importlib
import io
import pickle
import sys
from typing import Any

# The flat layout's module -> the module that holds its code now (modules of layers below search
# and search itself; tracking's old path is a package, see tracking/__init__.py).
FLAT_LAYOUT = {
    "posetune.perception": "posetune.data.perception",
    "posetune.datasets": "posetune.data.tools",
    "posetune.synth": "posetune.data.synth",
    "posetune.geometry": "posetune.data.geometry",
    "posetune.model": "posetune.train.model",
    "posetune.losses": "posetune.train.losses",
    "posetune.metrics": "posetune.train.metrics",
    "posetune.checkpoint": "posetune.train.checkpoint",
    "posetune.inference": "posetune.train.inference",
    "posetune.placement": "posetune.cluster.placement",
    "posetune.clusterfiles": "posetune.cluster.files",
    "posetune.worker_logging": "posetune.cluster.worker_logging",
    "posetune.space": "posetune.search.space",
    "posetune.searchers": "posetune.search.searchers",
    "posetune.trial": "posetune.search.trial",
    "posetune.results": "posetune.search.results",
}


def alias_flat_layout() -> None:
    """Make every flat-layout module name importable (idempotent)."""
    for old, new in FLAT_LAYOUT.items():
        sys.modules.setdefault(old, importlib.import_module(new))


class _EitherLayoutUnpickler(pickle.Unpickler):
    """Finds a flat-layout class where its code lives now (pickle's own hook for renames)."""

    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(FLAT_LAYOUT.get(module, module), name)


def loads(data: bytes) -> Any:
    """pickle.loads for an object saved by either layout. Unlike alias_flat_layout it imports
    only what the pickle names: the end of every search reads the searcher's state, and
    importing every old module (torch and torchvision among them) took seconds there."""
    return _EitherLayoutUnpickler(io.BytesIO(data)).load()
