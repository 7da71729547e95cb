"""posetune: hyperparameter search and training for 6-DoF object pose estimation.

The public API for use from Python. Names are imported on first use (PEP 562), so that
`import posetune` and the CLI's `--help` or config errors do not wait seconds for torch;
the search (Ray) and tracking (MLflow) live in `posetune.search` / `posetune.space` /
`posetune.tracking`.
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
    "evaluate_checkpoint": "posetune.train.inference",
    "model_from_checkpoint": "posetune.train.inference",
    "predict_images": "posetune.train.inference",
    "METRIC_NAMES": "posetune.train.metrics",
    "pose_metrics": "posetune.train.metrics",
    "create_model": "posetune.train.model",
    "list_backbones": "posetune.train.model",
    "FitResult": "posetune.train.loop",
    "fit": "posetune.train.loop",
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
    "load_config",
    "model_from_checkpoint",
    "pose_metrics",
    "predict_images",
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
    from posetune.train.inference import evaluate_checkpoint, model_from_checkpoint, predict_images
    from posetune.train.loop import FitResult, fit
    from posetune.train.metrics import METRIC_NAMES, pose_metrics
    from posetune.train.model import create_model, list_backbones
