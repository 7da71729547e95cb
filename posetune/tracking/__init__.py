"""MLflow tracking: a listener of the search's events (a parent run, one child per trial), training
runs, the model registry and `posetune ui`. No Ray.

`store` (where runs go, the client, the background logger), `runs` (`SearchRun`, `TrainRun`,
`open_search_run`), `registry` (register and load models), `ui` (`posetune ui`), `plots`."""

from __future__ import annotations

import importlib

# posetune.tracking was one module (posetune/tracking.py) before this package: its names resolve
# here, on first use, to the module that holds each now (old name -> (module, name there)).
# Lazily, because importing the package must not import MLflow.
_FLAT_LAYOUT_NAMES = {
    **{
        name: ("posetune.tracking.store", name)
        for name in (
            "EXPERIMENT_KIND",
            "PROJECT_RUNS",
            "AsyncLogger",
            "_transient",
            "artifact_root_for",
            "check_tracking_uri",
            "embedded_store",
            "experiment_id_for",
            "resolve_tracking_uri",
        )
    },
    "_client": ("posetune.tracking.store", "mlflow_client"),
    **{
        name: ("posetune.tracking.runs", name)
        for name in (
            "STATE_FILE",
            "SearchRun",
            "TrainRun",
            "_log_plots",
            "_metrics_batch",
            "_params",
            "_read_state",
            "_tag_list",
            "_train_outcome",
            "_warn_unlogged",
            "_write_state",
            "close_run",
            "git_commit",
            "log_params",
            "posetune_tags",
        )
    },
    "register_model": ("posetune.tracking.registry", "register_model"),
    "load_registered_model": ("posetune.tracking.registry", "load_registered_model"),
    "start_ui": ("posetune.tracking.ui", "start_ui"),
    "experiment_urls": ("posetune.tracking.ui", "experiment_urls"),
}


def __getattr__(name: str):
    if name in _FLAT_LAYOUT_NAMES:
        module, attribute = _FLAT_LAYOUT_NAMES[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'posetune.tracking' has no attribute {name!r}")
