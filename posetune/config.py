"""The typed configuration tree and how it is resolved.

Resolution order, lowest priority first (applied in ``load_config``):

    defaults  <  YAML file (--config)  <  POSETUNE_<SECTION>__<KEY> environment  <  section.key=value

Sections and defaults follow the Unity pose-estimation reference (``estimator``, ``train``,
``val``, ``test``, ``dataset``, ``optimizer`` (the reference's ``adam_optimizer``),
``checkpoint``, ``system``), plus ``model``, ``loss`` and ``tracking``. Knobs the reference
lacks default to the better-behaved choice (sign-invariant orientation loss, ImageNet input
normalisation, shuffled training order).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from posetune import choices, storage
from posetune.errors import ConfigError, StorageError

ENV_PREFIX = "POSETUNE_"


class Section(BaseModel):
    """Base for config sections: unknown keys are rejected, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class EstimatorConfig(Section):
    # The reference's `estimator: cube_position` names the Perception label whose pose is learned.
    label_name: str = Field("cube_position", min_length=1)


class TrainConfig(Section):
    batch_size: int = Field(20, gt=0)  # per worker; reference: batch_training_size
    accumulation_steps: int = Field(10, gt=0)  # effective batch = batch_size x this x workers
    epochs: int = Field(120, gt=0)
    # Stop after this many training samples (all workers together), mid-epoch if need be, when
    # that comes before train.epochs: a search's budget is in samples, not epochs.
    max_samples: int | None = Field(None, gt=0)
    beta_loss: float = Field(1.0, ge=0)  # weight of the orientation loss
    sample_size: int = Field(0, ge=0)  # use the first N training captures; 0 = all
    shuffle: bool = True  # the reference never shuffles; shuffling is almost always better
    # torch.compile the model: faster steps on GPU after a compile of tens of seconds; off until
    # benchmarks/gpu.py has measured it on the GPU in use.
    compile: bool = False


class ValConfig(Section):
    batch_size: int = Field(30, gt=0)
    eval_freq: int = Field(4, gt=0)  # evaluate every N epochs (and always after the last)
    # Evaluate every N training samples instead (mid-epoch if need be, and always at the end):
    # trials of different batch sizes are then evaluated, and judged by ASHA, at equal compute.
    eval_every_samples: int | None = Field(None, gt=0)
    sample_size: int = Field(0, ge=0)


class TestConfig(Section):
    batch_size: int = Field(30, gt=0)
    sample_size: int = Field(0, ge=0)


class DatasetConfig(Section):
    # A folder (or .zip) holding the split folders below, each a Unity Perception dataset.
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # Model input size: an int for a square image, or "WIDTHxHEIGHT".
    image_scale: int | str = 224
    # Optional fixed region of interest [left, top, right, bottom] in source pixels, cut
    # before the resize: the cube only ever appears in part of the frame.
    crop: list[int] | None = None
    symmetric: bool = False  # true: the object's rotation is ambiguous; learn translation only
    normalize: Literal["imagenet", "none"] = "imagenet"  # "none" feeds [0, 1] like the reference
    # Decoded, resized uint8 images are cached on disk so later epochs and trials skip PNG decoding.
    cache: bool = True
    cache_dir: str | None = None  # default: $XDG_CACHE_HOME/posetune (or ~/.cache/posetune)
    num_workers: int | None = Field(None, ge=0)  # DataLoader workers when decoding; None = auto
    # Training DataLoader worker processes (pinned memory, prefetch, persistent). None = auto:
    # min(4, CPUs) on a GPU, so decoding overlaps the step; none on a CPU, where workers take
    # cores from the step (benchmarks/step.py).
    loader_workers: int | None = Field(None, ge=0)

    @field_validator("image_scale")
    @classmethod
    def _check_image_scale(cls, value: int | str) -> int | str:
        parse_image_scale(value)
        return value

    @field_validator("crop")
    @classmethod
    def _check_crop(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if len(value) != 4:
            raise ValueError(f"must be [left, top, right, bottom] (4 pixel values), got {value}")
        left, top, right, bottom = value
        if min(value) < 0 or right <= left or bottom <= top:
            raise ValueError(f"must satisfy 0 <= left < right and 0 <= top < bottom, got {value}")
        return value

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the model input."""
        return parse_image_scale(self.image_scale)


class ModelConfig(Section):
    backbone: str = "vgg16"  # any name from `posetune.train.model.list_backbones()`
    # Local torchvision state_dict for the backbone (nothing is ever downloaded); None = random init.
    pretrained_weights: str | None = None
    # Spatial grid (N x N) the last feature map is pooled to before the heads. None keeps the
    # backbone's own: 7 for VGG (the reference), 1 (global) for the others, which loses where
    # the object is in the image; 2-4 helps them regress position.
    pool_size: int | None = Field(None, gt=0)
    # torchvision builds MobileNet/EfficientNet with BatchNorm momentum 0.01, tuned for long
    # ImageNet runs; in short runs their running statistics lag the weights so far that early
    # evaluations look like random guessing (and ASHA stops good trials). None keeps torchvision's.
    batchnorm_momentum: float | None = Field(0.1, gt=0, le=1)
    # Multi-worker trials: BatchNorm statistics over every worker's batch together, so that
    # N workers x batch B update like one batch of N x B (per-worker BatchNorm does not).
    sync_batchnorm: bool = False
    translation_head: list[int] = Field(default_factory=lambda: [256, 64])  # reference widths
    orientation_head: list[int] = Field(default_factory=lambda: [256, 64])

    @field_validator("backbone")
    @classmethod
    def _check_backbone(cls, value: str) -> str:
        return choices.check_choice(value, choices.BACKBONES)

    @field_validator("translation_head", "orientation_head")
    @classmethod
    def _check_widths(cls, value: list[int]) -> list[int]:
        if any(width <= 0 for width in value):
            raise ValueError(f"layer widths must be > 0, got {value}")
        return value


class LossConfig(Section):
    # `mse` is the reference's (treats q and -q as different). The default, `geodesic`
    # (1 - <q, q_hat>^2), is sign-invariant and learned fastest in posetune's measurements.
    orientation: str = "geodesic"

    @field_validator("orientation")
    @classmethod
    def _check_orientation(cls, value: str) -> str:
        return choices.check_choice(value, choices.ORIENTATION_LOSSES)


class OptimizerConfig(Section):
    lr: float = Field(1e-4, gt=0)
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.999, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: str = "constant"  # any name from `posetune.train.schedule.list_schedules()`
    warmup_epochs: float = Field(0.0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # floor of decaying schedules, as a share of lr
    grad_clip_norm: float | None = Field(None, gt=0)  # clip the global gradient norm; None = off
    fused: bool = False  # torch's fused Adam kernel on CUDA (ignored on CPU); off until measured

    @field_validator("schedule")
    @classmethod
    def _check_schedule(cls, value: str) -> str:
        return choices.check_choice(value, choices.SCHEDULES)


class CheckpointConfig(Section):
    # Continue a run from this checkpoint (model, optimizer, schedule, epoch, RNG).
    resume: str | None = None
    save_frequency: int = Field(1, gt=0)  # write checkpoints/last.pt every N epochs
    monitor: str = "pose_error"  # validation metric that picks checkpoints/best.pt

    @field_validator("monitor")
    @classmethod
    def _check_monitor(cls, value: str) -> str:
        return choices.check_choice(value, choices.METRIC_NAMES)


class SystemConfig(Section):
    # The run folder; None = runs/train-<timestamp>.
    out_dir: str | None = None
    progress: bool = True  # progress bar on a terminal


class TrackingConfig(Section):
    """MLflow tracking (used by `posetune train`; the search file has its own section)."""

    enabled: bool = True
    # None: $MLFLOW_TRACKING_URI if set, else the embedded SQLite store runs/mlflow.db.
    tracking_uri: str | None = None
    experiment_name: str | None = None  # None: "posetune" for train, the search's name for a search
    registered_model_name: str | None = None  # register the best model under this name
    log_checkpoints: bool = True  # the best checkpoint as a run artifact


class Config(Section):
    seed: int = 0
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:N
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16/fp16 AMP on GPU
    estimator: EstimatorConfig = Field(default_factory=EstimatorConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    val: ValConfig = Field(default_factory=ValConfig)
    test: TestConfig = Field(default_factory=TestConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    system: SystemConfig = Field(default_factory=SystemConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe nested dict (what is saved with runs and checkpoints)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def parse_image_scale(value: int | str | list | tuple) -> tuple[int, int]:
    """224 -> (224, 224); "320x240" -> (320, 240)."""
    if isinstance(value, bool):
        raise ValueError(f"must be an int or 'WIDTHxHEIGHT', got {value!r}")
    if isinstance(value, int):
        size = (value, value)
    elif isinstance(value, str) and re.fullmatch(r"\d+", value.strip()):
        size = (int(value),) * 2
    elif isinstance(value, str) and re.fullmatch(r"\d+\s*x\s*\d+", value.strip()):
        width, height = value.lower().split("x")
        size = (int(width), int(height))
    else:
        raise ValueError(f"must be an int or 'WIDTHxHEIGHT' (e.g. 224 or 128x96), got {value!r}")
    if min(size) < 16:
        raise ValueError(f"must be at least 16 pixels per side, got {value!r}")
    return size


# ---------------------------------------------------------------------------------------
# Resolution: defaults < YAML < environment < command-line overrides
# ---------------------------------------------------------------------------------------


def config_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """All valid dotted keys, e.g. ['seed', ..., 'train.batch_size', ...]."""
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            keys += config_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def parse_override(text: str) -> tuple[str, Any]:
    """'train.epochs=5' -> ('train.epochs', 5). Values are parsed as YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.epochs=5)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML: keep the literal string, the type check decides
    return key, value


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """Load a YAML file that must hold a mapping, with errors that name the file and line."""
    try:
        text = storage.read_text(path)  # a local file, gs:// or http(s)://
    except StorageError as exc:
        raise ConfigError(f"{what} {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{what} {path}:{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'epochs': 5}} -> {'train.epochs': 5}. Only known sections are descended into,
    so an unknown key is reported whole rather than split into its leaves."""
    flat: dict[str, Any] = {}
    sections = {k.rsplit(".", 1)[0] for k in config_keys() if "." in k}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and dotted in sections:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # a section set to a scalar earlier; report below
                break
        else:
            node[leaf] = value
    return tree


def env_overrides(environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    """POSETUNE_TRAIN__BATCH_SIZE=32 -> {'train.batch_size': (32, 'POSETUNE_TRAIN__BATCH_SIZE')}."""
    found = {}
    for name, raw in environ.items():
        if name.startswith(ENV_PREFIX):
            key = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            found[key] = (parse_override(f"{key}={raw}")[1], name)
    return found


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
    base: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    settings_source: str = "settings",
) -> Config:
    """Resolve a Config from defaults, an optional YAML file, the environment and overrides.

    ``base`` (a nested dict, e.g. a config saved in a checkpoint) sits between the defaults
    and the YAML file. ``settings`` ({dotted key: typed value}, e.g. a search file's
    base.overrides or a trial's sampled parameters) come after the environment and before the
    ``section.key=value`` strings, and are taken as they are: never re-parsed from text, so
    "/data/run #2" or "off" stay strings. Every problem is raised as one ``ConfigError``.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def apply(flat: Mapping[str, Any], source: str) -> None:
        for key, value in flat.items():
            values[key] = value
            sources[key] = source

    if base:
        apply(flatten(base), "base config")
    if path is not None:
        apply(flatten(read_yaml_mapping(path, "config file")), str(path))
    for key, (value, name) in env_overrides(environ).items():
        apply({key: value}, name)
    apply(settings or {}, settings_source)
    for text in overrides:
        key, value = parse_override(text)
        apply({key: value}, f"argument {text!r}")
    return validate_config(values, sources)


def validate_config(values: Mapping[str, Any], sources: Mapping[str, str]) -> Config:
    """Check keys and types; one ConfigError listing every problem."""
    valid = config_keys()
    problems = []
    for key in values:
        if key not in valid:
            suggestion = choices.did_you_mean(key, valid) or "; see `posetune config --keys`"
            problems.append(f"{key} (from {sources[key]}): unknown key{suggestion}")
    known = {k: v for k, v in values.items() if k in valid}
    try:
        config = Config.model_validate(unflatten(known))
    except ValidationError as exc:
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"] if not isinstance(part, int))
            key = next((k for k in known if key.startswith(k)), key)
            source = f" (from {sources[key]})" if key in sources else ""
            shown = known.get(key, error.get("input"))
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{key} = {shown!r}{source}: {message[0].lower()}{message[1:]}")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return config


def config_from_dict(tree: Mapping[str, Any]) -> Config:
    """Rebuild a Config saved with a run or checkpoint (no environment, no overrides)."""
    flat = flatten(tree)
    return validate_config(flat, {key: "saved config" for key in flat})
