"""posetune: hyperparameter search and training for 6-DoF object pose estimation.

The public API for use from Python. Names are imported on first use (PEP 562), so that
`import posetune` and the CLI's `--help` or config errors do not wait seconds for torch, Ray
or MLflow. A tracked search, as `posetune search` runs it:

    space, base = posetune.load_space("search_spaces/quick.yaml")
    with posetune.open_search_run(space, "search_spaces/quick.yaml") as run:
        summary = posetune.run_search(space, base, listeners=[run])
    print("\n".join(posetune.summary_lines(summary)))

Each registry chosen by name in YAML has a ``list_*`` to discover its names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "posetune.config",
    "load_config": "posetune.config",
    "CheckpointError": "posetune.errors",
    "ConfigError": "posetune.errors",
    "DataError": "posetune.errors",
    "PosetuneError": "posetune.errors",
    "list_storage_schemes": "posetune.storage",
    "evaluate_checkpoint": "posetune.train.inference",
    "model_from_checkpoint": "posetune.train.inference",
    "predict_images": "posetune.train.inference",
    "METRIC_NAMES": "posetune.train.metrics",
    "pose_metrics": "posetune.train.metrics",
    "create_model": "posetune.train.model",
    "list_backbones": "posetune.train.model",
    "list_orientation_losses": "posetune.train.losses",
    "list_schedules": "posetune.train.schedule",
    "FitResult": "posetune.train.loop",
    "fit": "posetune.train.loop",
    "load_space": "posetune.search.space",
    "list_samplers": "posetune.search.searchers",
    "list_schedulers": "posetune.search.searchers",
    "plan_search": "posetune.search.run",
    "run_search": "posetune.search.run",
    "summary_lines": "posetune.search.results",
    "open_search_run": "posetune.tracking.runs",
}
__all__ = [  # the names above, literally, for linters and `from posetune import *`
    "METRIC_NAMES",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "FitResult",
    "PosetuneError",
    "create_model",
    "evaluate_checkpoint",
    "fit",
    "list_backbones",
    "list_orientation_losses",
    "list_samplers",
    "list_schedulers",
    "list_schedules",
    "list_storage_schemes",
    "load_config",
    "load_space",
    "model_from_checkpoint",
    "open_search_run",
    "plan_search",
    "pose_metrics",
    "predict_images",
    "run_search",
    "summary_lines",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'posetune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*__all__, "__version__"]


if TYPE_CHECKING:  # what type checkers and IDEs see
    from posetune.config import Config, load_config
    from posetune.errors import CheckpointError, ConfigError, DataError, PosetuneError
    from posetune.search.results import summary_lines
    from posetune.search.run import plan_search, run_search
    from posetune.search.searchers import list_samplers, list_schedulers
    from posetune.search.space import load_space
    from posetune.storage import list_storage_schemes
    from posetune.tracking.runs import open_search_run
    from posetune.train.inference import evaluate_checkpoint, model_from_checkpoint, predict_images
    from posetune.train.loop import FitResult, fit
    from posetune.train.losses import list_orientation_losses
    from posetune.train.metrics import METRIC_NAMES, pose_metrics
    from posetune.train.model import create_model, list_backbones
    from posetune.train.schedule import list_schedules
