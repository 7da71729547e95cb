"""Search-space files (`search_spaces/*.yaml`): schema, validation, sampling, trial configs.

A file has five sections (documented in search_spaces/README.md):

    base:        the config file and overrides every trial starts from (+ optional synthetic data)
    parameters:  dotted config keys -> distributions (loguniform, uniform, int, choice, fixed),
                 optionally conditional (`when: {other.key: value}`); the pseudo-parameter
                 `effective_batch` searches batch_size x accumulation_steps x workers directly
    search:      metric, mode, num_samples, concurrency, seed, searcher, initial points, ASHA
    resources:   workers per trial, CPUs and GPUs per worker
    storage:     experiment name, folder, checkpoints kept per trial

Everything is validated before Ray starts, and every problem is reported at once with its key
path, the bad value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from posetune import storage
from posetune.choices import METRIC_NAMES, SCHEDULERS, SEARCHERS, check_choice, did_you_mean, metric_mode
from posetune.cluster.autoscaler import Autoscaler, from_launcher_config
from posetune.config import (
    Config,
    TrackingConfig,
    config_keys,
    flatten,
    load_config,
    parse_override,
    read_yaml_mapping,
)
from posetune.errors import ConfigError

EFFECTIVE_BATCH = "effective_batch"  # pseudo-parameter: samples per optimizer step
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice", "fixed")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Parameter(_Strict):
    distribution: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    values: list[Any] | None = None
    value: Any = None
    when: dict[str, Any] | None = None  # sampled only when these parameters have these values

    def candidates(self) -> list[Any]:
        """Values that bound what this parameter can take (to validate against the config)."""
        if self.distribution == "choice":
            return list(self.values or [])
        if self.distribution == "fixed":
            return [self.value]
        if self.distribution == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


class Synthetic(_Strict):
    """Generate dataset.root with `posetune data synth` when it does not exist yet."""

    train: int = Field(2000, gt=0)
    val: int = Field(300, gt=0)
    seed: int = 0


class Base(_Strict):
    config: str | None = None  # relative to the search-space file
    overrides: dict[str, Any] = Field(default_factory=dict)  # dotted config keys -> values
    synthetic: Synthetic | None = None


class Asha(_Strict):
    """ASHA on training samples seen, so trials with different batch sizes get equal compute.
    Every trial evaluates at the same sample milestones (val.eval_every_samples, by default
    grace_samples), and every rung is one of them."""

    max_samples: int = Field(gt=0)  # budget of a trial that is never stopped
    grace_samples: int = Field(gt=0)  # no trial is stopped before this
    reduction_factor: float = Field(3.0, gt=1)
    brackets: int = Field(1, gt=0)  # Ray's ASHA brackets: bracket k's first rung is grace x factor^k
    # Stop at a rung only once its values have ranked the final values of `rung_evidence`
    # trials that trained their whole budget with a Spearman correlation of at least this
    # (null: always, as Ray's ASHA). A rung that ranks badly never stops a trial.
    rung_correlation: float | None = Field(None, ge=-1, le=1)
    rung_evidence: int = Field(5, ge=3)

    def rungs(self) -> list[float]:
        """Where ASHA judges trials: grace x factor^k up to max_samples (as Ray's ASHA)."""
        count = int(math.log(self.max_samples / self.grace_samples) / math.log(self.reduction_factor) + 1)
        return [self.grace_samples * self.reduction_factor**k for k in range(count)]


class SearchSettings(_Strict):
    metric: str = "pose_error"
    mode: Literal["min", "max"] | None = None  # default: the metric's natural direction
    num_samples: int = Field(8, gt=0)
    max_concurrent_trials: int | None = Field(None, gt=0)  # None: as many as the cluster fits
    seed: int = 0
    searcher: str = "tpe"
    scheduler: str = "asha"  # fifo: every trial trains to asha.max_samples (a plain sweep)
    startup_trials: int | Literal["auto"] = "auto"  # random trials before TPE/GP/CMA-ES model the results
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    asha: Asha

    @field_validator("searcher")
    @classmethod
    def _check_searcher(cls, value: str) -> str:
        return check_choice(value, SEARCHERS)

    @field_validator("scheduler")
    @classmethod
    def _check_scheduler(cls, value: str) -> str:
        return check_choice(value, SCHEDULERS)

    @field_validator("startup_trials")
    @classmethod
    def _check_startup(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("must be >= 0 (or auto)")
        return value

    @property
    def resolved_startup_trials(self) -> int:
        """auto: a quarter of the search, at least 2. Optuna's default (10) suits studies of
        ~100 trials; on the 8 to 50 trials users run here it would leave TPE little or nothing
        to propose. Two finished trials are the fewest its good/bad split can use."""
        if self.startup_trials == "auto":
            return max(2, self.num_samples // 4)
        return self.startup_trials

    @property
    def resolved_mode(self) -> str:
        return self.mode or metric_mode(self.metric)


class NodeTypeSpec(_Strict):
    """One worker node type of the cluster, as in a cluster file's available_node_types."""

    resources: dict[str, float]  # what one node offers Ray: {CPU: 8, GPU: 1}
    min_workers: int = Field(0, ge=0)
    max_workers: int = Field(gt=0)


class Resources(_Strict):
    workers_per_trial: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float | Literal["auto"] = "auto"  # auto: 1 when the cluster has GPUs
    local_cpus: int | None = Field(None, gt=0)  # CPUs of a Ray instance posetune starts itself; None = all
    # Price of one resource-hour ({GPU: 0.85, CPU: 0.035}, in your currency): the summary,
    # results.json and MLflow then report what the trials' workers cost, not only how long.
    prices: dict[Literal["CPU", "GPU"], Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    # The node types an autoscaler may start, when posetune cannot read them from the cluster
    # (see posetune/cluster/autoscaler.py for where it looks), and the cluster-wide cap on workers.
    node_types: dict[str, NodeTypeSpec] = Field(default_factory=dict)
    max_workers: int | None = Field(None, ge=0)  # None: the sum of the types' max_workers

    def autoscaler(self) -> Autoscaler | None:
        """The search file's node types (the user's override), or None to read the cluster's."""
        if not self.node_types:
            return None
        types = {name: spec.model_dump() for name, spec in self.node_types.items()}
        config = {"available_node_types": types, "max_workers": self.max_workers}
        return from_launcher_config(config, "the search file (resources.node_types)")


class Storage(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # A local folder (relative to the working directory) or gs://BUCKET/PATH. On a cluster of
    # more than one node it must be a bucket or a filesystem every node mounts (shared: true).
    path: str = "runs/search"
    shared: bool = False  # path is local but on a filesystem every node mounts (NFS, ...)
    keep_checkpoints: int = Field(2, gt=0)  # per trial; each holds last.pt and the trial's best.pt


class SearchSpace(_Strict):
    base: Base = Field(default_factory=Base)
    parameters: dict[str, Parameter]
    search: SearchSettings
    resources: Resources = Field(default_factory=Resources)
    storage: Storage
    # MLflow: a parent run per search, a child per trial; registered model default posetune-<name>.
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


# --- Loading and validation ---------------------------------------------------------------------

SPACE_SECTIONS = ("base", "parameters", "search", "resources", "storage", "tracking")


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Command-line overrides: (search-file ones like search.num_samples=4, config ones)."""
    space, config = [], []
    for text in overrides:
        (space if text.split(".", 1)[0] in SPACE_SECTIONS else config).append(text)
    return space, config


def load_space(path: str | Path, overrides: list[str] = (), name: str | None = None) -> tuple[SearchSpace, Config]:
    """Parse and validate a search-space file; return it with the resolved base config.

    `overrides` may set search-file keys (search.num_samples=4) or base config keys
    (train.epochs=3); `name` replaces storage.name. Raises one ConfigError listing every problem.
    """
    path = storage.local_path(path, "the search-space file")
    raw = read_yaml_mapping(path, "search space")
    space_overrides, config_overrides = split_overrides(list(overrides))
    for text in space_overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    if name is not None:
        raw.setdefault("storage", {})["name"] = name
    problems: list[str] = []
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid search space {path}:\n  " + "\n  ".join(_pydantic_problems(exc, raw))) from None
    base_cfg = _check_base(space, path, config_overrides, problems)
    _check_parameters(space, base_cfg, problems)
    _check_search(space, problems)
    if base_cfg is not None and not problems:
        _check_milestones(space, base_cfg, problems)
    if problems:
        raise ConfigError(f"invalid search space {path}:\n  " + "\n  ".join(problems))
    return space, base_cfg


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """search.asha.max_samples=10 -> tree['search']['asha']['max_samples'] = 10.
    Under `parameters` the rest of the key is a (dotted) config key."""
    section, _, rest = dotted.partition(".")
    if section == "parameters":
        key, _, field = rest.rpartition(".")
        tree.setdefault("parameters", {}).setdefault(key, {})[field] = value
        return
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _pydantic_problems(exc: ValidationError, raw: Mapping[str, Any]) -> list[str]:
    problems = []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            section = ".".join(str(p) for p in error["loc"][:-1])
            allowed = _allowed_fields(error["loc"][:-1])
            suggestion = did_you_mean(str(error["loc"][-1]), allowed) or f"; allowed: {', '.join(allowed)}"
            problems.append(f"{key}: unknown key in {section or 'the file'}{suggestion}")
        elif error["type"] == "missing":
            problems.append(f"{key}: required")
        else:
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{key} = {error.get('input')!r}: {message[0].lower()}{message[1:]}")
    return problems


def _allowed_fields(loc: tuple) -> list[str]:
    model: type[BaseModel] = SearchSpace
    for part in loc:
        if model is SearchSpace and part == "parameters":
            return []
        if isinstance(part, str) and part in model.model_fields:
            annotation = model.model_fields[part].annotation
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else Parameter
        elif model is SearchSpace or isinstance(part, int):
            continue
    return list(model.model_fields)


def _check_base(space: SearchSpace, path: Path, config_overrides: list[str], problems: list[str]) -> Config | None:
    """The base config: file (relative to the space file) < base.overrides < command line."""
    config_path = None
    if space.base.config:
        config_path = (path.parent / space.base.config).resolve()
        if not config_path.is_file():
            problems.append(f"base.config: {space.base.config} not found (looked at {config_path})")
            return None
    try:
        cfg = load_config(
            config_path, config_overrides, settings=space.base.overrides, settings_source="base.overrides"
        )
    except ConfigError as exc:
        problems += [f"base: {line.strip()}" for line in str(exc).splitlines()[1:]]
        return None
    if cfg.dataset.root is None:
        problems.append("base.overrides: dataset.root is not set (the dataset every trial trains on)")
    elif space.base.synthetic is None and not storage.exists(cfg.dataset.root):
        problems.append(
            f"dataset.root = {cfg.dataset.root!r} does not exist; create it (posetune data synth) "
            "or add base.synthetic to generate it on first use"
        )
    return cfg


def _check_parameters(space: SearchSpace, base_cfg: Config | None, problems: list[str]) -> None:
    valid = set(config_keys())
    declared: dict[str, Parameter] = {}
    for key, p in space.parameters.items():
        where = f"parameters.{key}"
        if key != EFFECTIVE_BATCH and key not in valid:
            problems.append(f"{where}: unknown config key{did_you_mean(key, valid)}")
            continue
        distribution_problems = _distribution_problems(p)
        problems += [f"{where}: {message}" for message in distribution_problems]
        problems += _condition_problems(where, p, declared)
        declared[key] = p
        if key != EFFECTIVE_BATCH and not distribution_problems:
            for value in p.candidates():  # against the defaults when the base itself is broken
                try:
                    load_config(base=(base_cfg or Config()).to_dict(), settings={key: value}, environ={})
                except ConfigError as exc:
                    detail = str(exc).splitlines()[-1].strip().split(": ", 1)[-1]
                    problems.append(f"{where}: value {value!r} is not allowed: {detail}")
    if EFFECTIVE_BATCH in declared:
        _check_effective_batch(space, declared, problems)


def _distribution_problems(p: Parameter) -> list[str]:
    kind, low, high = p.distribution, p.low, p.high
    if kind not in DISTRIBUTIONS:
        return [f"distribution = {kind!r} is not known; choose one of: {', '.join(DISTRIBUTIONS)}"]
    if kind == "choice":
        if not p.values:
            return ["choice needs a non-empty `values` list"]
        bad = [v for v in p.values if not isinstance(v, (str, int, float, bool, type(None)))]
        return [f"choice values must be scalars (str, number, bool, null), got {bad[0]!r}"] if bad else []
    if kind == "fixed":
        return [] if "value" in p.model_fields_set else ["fixed needs a `value`"]
    problems = []
    if low is None or high is None:
        return [f"{kind} needs `low` and `high`"]
    if low >= high:
        problems.append(f"low must be < high, got low={low:g} high={high:g}")
    if (kind == "loguniform" or p.log) and low <= 0:
        problems.append(f"a log distribution needs low > 0, got low={low:g}")
    if kind == "int":
        if low != int(low) or high != int(high):
            problems.append(f"int bounds must be whole numbers, got low={low:g} high={high:g}")
        if p.step is not None and (p.step < 1 or p.step != int(p.step)):
            problems.append(f"int step must be a whole number >= 1, got {p.step:g}")
        if p.log and p.step not in (None, 1):
            problems.append("int with log: true cannot have a step other than 1")
    elif p.step is not None and (p.step <= 0 or kind == "loguniform"):
        problems.append(f"step must be > 0 and is only allowed for uniform and int, got {p.step:g}")
    return problems


def _condition_problems(where: str, p: Parameter, declared: Mapping[str, Parameter]) -> list[str]:
    problems = []
    for key, value in (p.when or {}).items():
        if key not in declared:
            problems.append(f"{where}.when: {key} must be a parameter declared before {where.split('.', 1)[1]}")
        elif declared[key].distribution in ("choice", "fixed") and value not in declared[key].candidates():
            problems.append(
                f"{where}.when: {key} never takes the value {value!r} (it takes {declared[key].candidates()})"
            )
    return problems


def _check_effective_batch(space: SearchSpace, declared: Mapping[str, Parameter], problems: list[str]) -> None:
    if "train.accumulation_steps" in declared:
        problems.append("parameters.train.accumulation_steps: derived from effective_batch; declare only one of them")
    p = declared[EFFECTIVE_BATCH]
    if p.distribution not in ("int", "choice", "fixed"):
        problems.append(
            f"parameters.effective_batch: must be an int, choice or fixed distribution, got {p.distribution}"
        )
        return
    batch = declared.get("train.batch_size")
    if _distribution_problems(p) or (batch and _distribution_problems(batch)):
        return  # already reported
    largest_batch = max(batch.candidates()) if batch else None
    if largest_batch and largest_batch * space.resources.workers_per_trial > max(p.candidates()):
        problems.append(
            f"parameters.effective_batch: its largest value {max(p.candidates())} is below train.batch_size "
            f"{largest_batch} x {space.resources.workers_per_trial} worker(s)"
        )


def _check_search(space: SearchSpace, problems: list[str]) -> None:
    s = space.search
    if s.metric not in METRIC_NAMES:
        problems.append(
            f"search.metric = {s.metric!r} is not a metric{did_you_mean(s.metric, METRIC_NAMES) or ';'} "
            f"choose one of: {', '.join(METRIC_NAMES)}"
        )
    if s.asha.grace_samples > s.asha.max_samples:
        problems.append(
            f"search.asha.grace_samples = {s.asha.grace_samples} must be <= max_samples ({s.asha.max_samples})"
        )
    for n, point in enumerate(s.points_to_evaluate):
        for key, value in point.items():
            p = space.parameters.get(key)
            if p is None:
                problems.append(f"search.points_to_evaluate[{n}].{key}: not a declared parameter")
            elif not _within(p, value):
                problems.append(f"search.points_to_evaluate[{n}].{key} = {value!r} is outside its distribution")


def eval_milestone(space: SearchSpace, base_cfg: Config) -> int:
    """Every trial evaluates each this many samples: val.eval_every_samples if the base sets
    it, else ASHA's grace period (its first rung, so that every rung is a milestone)."""
    return base_cfg.val.eval_every_samples or space.search.asha.grace_samples


def _check_milestones(space: SearchSpace, base_cfg: Config, problems: list[str]) -> None:
    """Equal compute: every trial, whatever its batch size, reaches each milestone exactly
    (a whole number of batches x workers), and ASHA's rungs and the budget are milestones."""
    every, asha = eval_milestone(space, base_cfg), space.search.asha
    source = "val.eval_every_samples" if base_cfg.val.eval_every_samples else "search.asha.grace_samples"
    batch = space.parameters.get("train.batch_size")
    if batch is None:
        sizes = [base_cfg.train.batch_size]
    elif batch.distribution in ("choice", "fixed"):
        sizes = [int(b) for b in batch.candidates()]
    else:  # an int range: every value in it
        sizes = list(range(int(batch.low), int(batch.high) + 1, int(batch.step or 1)))
    workers = space.resources.workers_per_trial
    step = math.lcm(*sizes) * workers
    if every % step:
        problems.append(
            f"{source} = {every:,}: every trial must reach each evaluation milestone exactly, so it "
            f"must be a multiple of {step:,} (train.batch_size {sizes} x {workers} worker(s)); "
            f"try {max(step, every // step * step):,}"
        )
        return
    if asha.max_samples % every:
        problems.append(
            f"search.asha.max_samples = {asha.max_samples:,} must be a multiple of {source} = {every:,} "
            "(a trial's last evaluation is at its budget)"
        )
    bad = [rung for rung in asha.rungs() if rung != int(rung) or int(rung) % every]
    if bad:
        problems.append(
            f"search.asha: the rung at {bad[0]:,.6g} samples (grace_samples x reduction_factor^k) is not a "
            f"multiple of {source} = {every:,}: ASHA would judge trials between evaluations"
        )


def _within(p: Parameter, value: Any) -> bool:
    if p.distribution in ("choice", "fixed"):
        return value in p.candidates()
    return isinstance(value, (int, float)) and not isinstance(value, bool) and p.low <= value <= p.high


# --- Sampling -----------------------------------------------------------------------------------


class DefineByRun:
    """An Optuna define-by-run space: conditional parameters are only suggested when their
    condition holds; fixed parameters are returned as constants. A class, not a closure,
    because Ray pickles the searcher (and this with it) to resume a search."""

    def __init__(self, space: SearchSpace):
        self.parameters = space.parameters

    def __call__(self, trial) -> dict[str, Any] | None:
        taken: dict[str, Any] = {}
        constants: dict[str, Any] = {}
        for key, p in self.parameters.items():
            if any(taken.get(k) != v for k, v in (p.when or {}).items()):
                continue
            if p.distribution == "fixed":
                taken[key] = constants[key] = p.value
            else:
                taken[key] = _suggest(trial, key, p)
        return constants or None


def _suggest(trial, key: str, p: Parameter) -> Any:
    if p.distribution == "loguniform":
        return trial.suggest_float(key, p.low, p.high, log=True)
    if p.distribution == "uniform":
        return trial.suggest_float(key, p.low, p.high, step=p.step)
    if p.distribution == "int":
        return trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_categorical(key, p.values)


def accumulation_for(effective: int, batch_size: int, workers: int, bounds: tuple[int, int]) -> int:
    """Accumulation steps whose effective batch (batch x steps x workers) is nearest `effective`
    while staying inside `bounds` when any multiple of batch x workers fits there."""
    per_step = batch_size * workers
    low, high = bounds
    steps = max(1, round(effective / per_step))
    if steps * per_step > high and steps > 1:
        steps = max(1, high // per_step)
    if steps * per_step < low and (steps + 1) * per_step <= high:
        steps = math.ceil(low / per_step)
    return steps


def trial_config(space: SearchSpace, base_cfg: Config, params: Mapping[str, Any]) -> Config:
    """The Config one trial trains with: base + sampled parameters (+ derived accumulation)."""
    values = {k: v for k, v in params.items() if k != EFFECTIVE_BATCH}
    if EFFECTIVE_BATCH in params:
        batch = values.get("train.batch_size", base_cfg.train.batch_size)
        p = space.parameters[EFFECTIVE_BATCH]
        bounds = (int(min(p.candidates())), int(max(p.candidates())))
        values["train.accumulation_steps"] = accumulation_for(
            int(params[EFFECTIVE_BATCH]), batch, space.resources.workers_per_trial, bounds
        )
    return load_config(base=base_cfg.to_dict(), settings=values, environ={}, settings_source="sampled parameters")


def used_values(space: SearchSpace, cfg: Config, params: Mapping[str, Any]) -> dict[str, Any]:
    """The searched values as the trial's config uses them: effective_batch after the derived
    accumulation is rounded (batch_size x accumulation_steps x workers), every other key as
    resolved."""
    flat = flatten(cfg.to_dict())
    used = {key: flat[key] for key in params if key != EFFECTIVE_BATCH}
    if EFFECTIVE_BATCH in params:
        workers = space.resources.workers_per_trial
        used[EFFECTIVE_BATCH] = cfg.train.batch_size * cfg.train.accumulation_steps * workers
    return used


def describe_parameter(p: Parameter) -> str:
    if p.distribution == "choice":
        text = f"choice {p.values}"
    elif p.distribution == "fixed":
        text = f"fixed {p.value!r}"
    else:
        text = f"{p.distribution} [{p.low:g}, {p.high:g}]"
        text += f" step {p.step:g}" if p.step else ""
        text += " log" if p.log and p.distribution == "int" else ""
    if p.when:
        text += "  when " + ", ".join(f"{k}={v}" for k, v in p.when.items())
    return text
