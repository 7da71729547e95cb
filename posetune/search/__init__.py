"""The search: space files, the Optuna searcher and the trial scheduler, one trial (a Ray Train
`TorchTrainer` running `fit`), the events a search emits, results records, and the run itself."""

from __future__ import annotations

import importlib

# posetune.search was one module (posetune/search.py) before the package layout. A search saved
# then pickled some of its objects by that path (the Tune callback `TrialEvents`, the trial folder
# namer `_trial_dirname`), and code written then imports its names: each resolves, on first use,
# to search/run.py, which holds them now. Lazily, because importing this package (as tracking
# does, for search.events) must not import Ray.
_FLAT_LAYOUT_NAMES = frozenset(
    {
        "TUNE_FOLDER",
        "TrialEvents",
        "_check_experiment_folder",
        "_finish",
        "_fingerprint",
        "_trial_dirname",
        "_tuner",
        "absolute_paths",
        "describe_plan",
        "ensure_dataset",
        "experiment_dir",
        "first_error_line",
        "load_study",
        "plan_resources",
        "run_search",
        "trial_outcome",
    }
)


def __getattr__(name: str):
    if name in _FLAT_LAYOUT_NAMES:
        return getattr(importlib.import_module("posetune.search.run"), name)
    raise AttributeError(f"module 'posetune.search' has no attribute {name!r}")
