"""Every name a user can choose in a config or search file, importable without torch.

The registries that build these (``posetune.train.model.BACKBONES``, ``posetune.train.losses.
ORIENTATION_LOSSES``, ``posetune.train.schedule.SCHEDULES``) are keyed by exactly these names (a test
keeps them equal), so a config or search file is checked, name by name, when it is read:
before torch loads, before data is read, before a Ray trial starts.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable

from posetune.errors import ConfigError

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
SEARCHERS = ("cmaes", "gp", "qmc", "random", "tpe")  # Optuna samplers (posetune.search.searchers.SAMPLERS)
SCHEDULERS = ("asha", "fifo")  # Tune trial schedulers (posetune.search.searchers.SCHEDULERS)
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
# What Optuna is told for a diverged trial (negated for a metric to maximise): finite, since
# TPE sorts on it, and worse than any real score (posetune.search.searchers).
DIVERGED_SCORE = 1e9


def diverged_result(metric: str, error: str | None, samples_seen: int) -> dict[str, object]:
    """What a diverged trial reports to Tune (and re-reports after a resume): NaN for the
    metric. ASHA's rung cut-offs are NaN-ignoring quantiles, so the rung is judged on the
    trials that trained; a finite "worst score" there would drag a quantile of two results
    half-way to it and stop nothing at that rung again."""
    return {"diverged": 1, "error": error, metric: math.nan, "samples_seen": samples_seen}


def metric_mode(name: str) -> str:
    """'max' for shares of good predictions, 'min' for errors."""
    return "max" if name in HIGHER_IS_BETTER else "min"


def better(value: float, than: float | None, mode: str) -> bool:
    """The one "is this score better" rule (checkpoints, trial records, ranking): a non-finite
    value never is; any finite value beats no score or a non-finite one."""
    if not math.isfinite(value):
        return False
    if than is None or not math.isfinite(than):
        return True
    return value < than if mode == "min" else value > than


def closest(name: str, names: Iterable[str]) -> str | None:
    """The name a typo most likely meant; dotted keys also match on their last part."""
    names = list(names)
    match = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if match:
        return match[0]
    by_leaf = {n.rsplit(".", 1)[-1]: n for n in names}
    match = difflib.get_close_matches(name.rsplit(".", 1)[-1], list(by_leaf), n=1, cutoff=0.75)
    return by_leaf[match[0]] if match else None


def did_you_mean(name: str, names: Iterable[str]) -> str:
    """'; did you mean X?' for a likely typo, else '' (the one way every message suggests)."""
    hint = closest(name, names)
    return f"; did you mean {hint}?" if hint else ""


def check_choice(value: str, choices: tuple[str, ...]) -> str:
    """A pydantic validator's body: the value, or an error listing every valid name."""
    if value not in choices:
        hint = did_you_mean(value, choices) or ";"
        raise ValueError(f"is not known{hint} choose one of: {', '.join(sorted(choices))}")
    return value


def unknown_choice(key: str, value: object, choices: Iterable[str]) -> ConfigError:
    """The error for a name that is not in a registry: the key, the value, every valid name."""
    hint = did_you_mean(str(value), choices) or ";"
    return ConfigError(f"{key} = {value!r} is not known{hint} choose one of: {', '.join(sorted(choices))}")
