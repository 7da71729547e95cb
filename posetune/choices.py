"""Every name a user can choose in a config or search file, importable without torch.

The registries that build these (``posetune.model.BACKBONES``, ``posetune.losses.
ORIENTATION_LOSSES``, ``posetune.train.SCHEDULES``) are keyed by exactly these names (a test
keeps them equal), so a config or search file is checked, name by name, when it is read:
before torch loads, before data is read, before a Ray trial starts.
"""

from __future__ import annotations

BACKBONES = (
    "efficientnet_b0",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "resnet18",
    "resnet34",
    "resnet50",
    "vgg16",
)
ORIENTATION_LOSSES = ("geodesic", "mse", "sign_invariant")
SCHEDULES = ("constant", "cosine", "linear")
METRIC_NAMES = (
    "translation_mse",
    "translation_error_cm",
    "orientation_rad",
    "orientation_error_deg",
    "orientation_error_deg_median",
    "within_2cm_5deg",
    "within_5cm_10deg",
    "pose_error",
)
HIGHER_IS_BETTER = frozenset({"within_2cm_5deg", "within_5cm_10deg"})


def metric_mode(name: str) -> str:
    """'max' for shares of good predictions, 'min' for errors."""
    return "max" if name in HIGHER_IS_BETTER else "min"


def check_choice(value: str, choices: tuple[str, ...]) -> str:
    """A pydantic validator's body: the value, or an error listing every valid name."""
    if value not in choices:
        raise ValueError(f"is not known; choose one of: {', '.join(sorted(choices))}")
    return value
