"""posetune: hyperparameter search and training for 6-DoF object pose estimation.

The public API for use from Python. The search (Ray) and tracking (MLflow) live in
``posetune.search`` / ``posetune.space`` / ``posetune.tracking`` and are imported on demand,
so that ``import posetune`` stays light.
"""

from posetune.config import Config, load_config
from posetune.errors import CheckpointError, ConfigError, DataError, PosetuneError
from posetune.inference import evaluate_checkpoint, model_from_checkpoint, predict_images
from posetune.metrics import METRIC_NAMES, pose_metrics
from posetune.model import create_model, list_backbones
from posetune.train import FitResult, fit

__version__ = "0.1.0"

__all__ = [
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
