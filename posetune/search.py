"""`posetune search`: Ray Tune over trials that each fit a Ray Train TorchTrainer.

Searcher: Optuna (TPE, or random for comparison) through Ray's OptunaSearch, with a
define-by-run space (conditional parameters). Scheduler: ASHA on *training samples seen*, so
trials with different batch sizes are stopped at equal compute. A trial that ASHA stops is
told to Optuna as PRUNED (see ``BudgetAwareOptunaSearch``), never as a finished trial with an
under-trained score.

Experiment folder ``<storage.path>/<storage.name>/``:
    tune/                   Ray Tune's experiment state and trial folders
    train/<trial id>/       Ray Train runs: each trial's checkpoints (last.pt + its best.pt)
    search.json             what was searched (to refuse a --resume with a different space)
    results.json            {"trials": [...]}, updated live (posetune.results)
    best_config.yaml        the best trial's config; `posetune train --config` accepts it
    best/model.pt           the best trial's best checkpoint
    summary.txt             the final table
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optuna.trial import TrialState
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from posetune import internals, placement, storage
from posetune.config import Config
from posetune.errors import ConfigError, PosetuneError
from posetune.perception import read_split
from posetune.placement import ClusterShape, ResourcePlan
from posetune.results import (
    REPORTED,
    Listener,
    Outcome,
    SearchEnded,
    SearchEvent,
    SearchResults,
    SearchStarted,
    SearchSummary,
    TrialEnded,
    TrialReported,
    TrialStarted,
    summary_lines,
)
from posetune.space import EFFECTIVE_BATCH, DefineByRun, SearchSpace, describe_parameter
from posetune.trial import TrialSetup, build_trial_config, run_trial, sweep_scratch_on_every_node

log = logging.getLogger(__name__)

# Tune's experiment lives in its own subfolder: on a resume Tune downloads that folder and
# syncs it back at every checkpoint, which would overwrite live files kept beside its own.
TUNE_FOLDER = "tune"


# --- Resources ---------------------------------------------------------------------------------


def plan_resources(space: SearchSpace, cluster: ClusterShape) -> ResourcePlan:
    """The search's resource plan on this cluster (see posetune.placement)."""
    r, s = space.resources, space.search
    return placement.plan_resources(
        workers_per_trial=r.workers_per_trial,
        cpus_per_worker=r.cpus_per_worker,
        gpus_per_worker=r.gpus_per_worker,
        num_samples=s.num_samples,
        max_concurrent_trials=s.max_concurrent_trials,
        cluster=cluster,
    )


def local_shape() -> ClusterShape:
    """This machine as a one-node cluster (what a local Ray instance would have)."""
    import torch

    cpus, gpus = float(os.cpu_count() or 1), float(torch.cuda.device_count())
    return ClusterShape([placement.Node({"CPU": cpus, "GPU": gpus, placement.HEAD_RESOURCE: 1.0}, "local")])


SHARED_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "9p"}


def on_shared_filesystem(path: str) -> bool:
    """Whether a local path lies on a network filesystem (NFS, Lustre, a FUSE bucket mount, ...)
    that other nodes can mount too, judged from this node's /proc/mounts."""
    target, best, fstype = os.path.realpath(path), "", ""
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                inside = len(fields) > 2 and (target == fields[1] or target.startswith(fields[1].rstrip("/") + "/"))
                if inside and len(fields[1]) > len(best):
                    best, fstype = fields[1], fields[2]
    except OSError:
        return False
    return fstype in SHARED_FILESYSTEMS or fstype.startswith("fuse.")


def check_storage_reachable(space: SearchSpace, folder: str, cluster: ClusterShape) -> None:
    """On more than one node every worker writes checkpoints to storage.path: a head-local
    folder would scatter them over the workers' disks."""
    if not cluster.multi_node or not storage.is_local(folder) or space.storage.shared:
        return
    if on_shared_filesystem(folder):
        return
    raise ConfigError(
        f"storage.path = {space.storage.path!r} is a local folder, but this cluster has more than one node "
        f"({cluster.describe()}) and workers on other nodes cannot write their checkpoints there: "
        "use a bucket (storage.path=gs://BUCKET/searches) or a filesystem every node mounts "
        "(then set storage.shared=true)"
    )


def connect_ray(num_cpus: int | None = None) -> bool:
    """Use a running cluster (RAY_ADDRESS, or one on this node such as a `ray up` head);
    otherwise start a local instance. Returns True when this process started Ray."""
    import ray

    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    hook: dict[str, Any] = {"worker_process_setup_hook": "posetune.worker_logging.quiet_ray_internals"}
    if os.environ.get("STORAGE_EMULATOR_HOST"):  # a GCS emulator reaches every worker too
        hook["env_vars"] = {"STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"]}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=hook, **quiet)
        return False
    if internals.local_cluster_running():
        ray.init(address="auto", runtime_env=hook, **quiet)
        return False
    # The dashboard process stays: Ray's state API behind it frees the workers of trials
    # that ASHA stops; without it they leak and later trials wait forever. Nothing is
    # preempted on a local instance, so Ray Train's preemption watcher (noisy) is off.
    no_preemption = {**hook, "env_vars": {**hook.get("env_vars", {}), "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}}
    # Every Ray process wakes up to collect metrics; on a small machine that competes with
    # training (measured ~5% of a 2-core box). Local instances skip it unless the user asks.
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=num_cpus, include_dashboard=True, runtime_env=no_preemption, **quiet)
    return True


# --- Searcher -----------------------------------------------------------------------------------


class BudgetAwareOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, made to match an ASHA budget in samples seen.

    - Intermediate values are reported at step = samples seen: Tune's training_iteration
      restarts at 1 after a resume and means different compute for different batch sizes.
    - A trial that ends before the budget (stopped by ASHA) or diverged is told as PRUNED.
      Ray tells it COMPLETE with its partial score, so TPE would learn from under-trained
      values as if they were final; Optuna's TPE ranks pruned trials below complete ones,
      by how far they got and then by their last value.
    """

    def __init__(self, *args, budget: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._budget = budget
        self._reported: dict[str, set[int]] = {}  # steps already reported, per trial

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in internals.searcher_told(self):
            self._report(trial_id, result)

    def _report(self, trial_id: str, result: dict) -> None:
        step = result.get("samples_seen")
        if result.get("diverged") or step is None or self.metric not in result:
            return
        if step not in self._reported.setdefault(trial_id, set()):
            self._reported[trial_id].add(step)
            internals.searcher_trial(self, trial_id).report(result[self.metric], step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        partial = result and (result.get("diverged") or result.get("samples_seen", 0) < self._budget)
        if error or not partial or trial_id in internals.searcher_told(self):
            super().on_trial_complete(trial_id, result, error)
            return
        # The result ASHA stopped the trial on arrives here, not through on_trial_result.
        self._report(trial_id, result)
        internals.searcher_study(self).tell(internals.searcher_trial(self, trial_id), state=TrialState.PRUNED)
        internals.searcher_told(self).add(trial_id)


def build_searcher(space: SearchSpace):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = space.search
    sampler = (
        optuna.samplers.TPESampler(seed=s.seed) if s.searcher == "tpe" else optuna.samplers.RandomSampler(seed=s.seed)
    )
    return BudgetAwareOptunaSearch(
        space=DefineByRun(space),
        metric=s.metric,
        mode=s.resolved_mode,
        sampler=sampler,
        points_to_evaluate=[dict(point) for point in s.points_to_evaluate] or None,
        budget=s.asha.max_samples,
    )


def build_scheduler(space: SearchSpace):
    from ray.tune.schedulers import ASHAScheduler

    asha = space.search.asha
    return ASHAScheduler(
        time_attr="samples_seen",
        max_t=asha.max_samples,
        grace_period=asha.grace_samples,
        reduction_factor=asha.reduction_factor,
    )


# --- Trial events -------------------------------------------------------------------------------


def trial_outcome(result: dict[str, Any], budget: int) -> Outcome:
    """How a trial that Tune completed ended, from its last result."""
    if result.get("diverged"):
        return Outcome.DIVERGED
    return Outcome.COMPLETED if result.get("samples_seen", 0) >= budget else Outcome.STOPPED_EARLY


class TrialEvents(tune.Callback):
    """The search's one Tune callback: Tune's trial callbacks as posetune's plain trial events
    (posetune.results), sent to every listener in order."""

    def __init__(self, listeners: Sequence[Listener], setup: TrialSetup, folder: str):
        # Not `self.setup`: that is a Tune callback method.
        self.listeners, self.trial_setup, self.folder = list(listeners), setup, folder

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into the experiment; listeners hold files, threads and
        # clients of this process, and a restored search attaches the live ones again.
        return {**self.__dict__, "listeners": []}

    def emit(self, event: SearchEvent) -> None:
        for listener in self.listeners:
            listener.on_event(event)

    def on_trial_start(self, iteration, trials, trial, **info):
        params = dict(trial.config)
        self.emit(TrialStarted(trial.trial_id, params, build_trial_config(self.trial_setup, params)))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("diverged"):  # the trial ends next, as diverged
            return
        metrics = {key: float(result[key]) for key in REPORTED if key in result}
        samples = int(result["samples_seen"])
        self.emit(TrialReported(trial.trial_id, dict(trial.config), samples, metrics, self._checkpoint(result)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        outcome = trial_outcome(result, self.trial_setup.space.search.asha.max_samples)
        error = result.get("error") if outcome is Outcome.DIVERGED else None
        self._ended(trial, outcome, error)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, Outcome.FAILED, first_error_line(trial))

    def _ended(self, trial, outcome: Outcome, error: str | None) -> None:
        result = trial.last_result or {}
        samples = int(result.get("samples_seen", 0))
        self.emit(TrialEnded(trial.trial_id, dict(trial.config), outcome, samples, error, self._checkpoint(result)))

    def _checkpoint(self, result: dict[str, Any]) -> str | None:
        """Ray's checkpoint path (bucket-relative on gs://) as a URI."""
        path = result.get("checkpoint_path")
        return storage.from_ray_path(self.folder, path) if path else None


def first_error_line(trial) -> str:
    """The root cause of a failed trial, in one line (Ray wraps it several times)."""
    try:
        error = trial.get_error()
    except Exception:  # diagnostics only: a missing error file must not fail the search
        error = None
    text = str(error or "unknown error")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    causes = [line for line in lines if "Error" in line.split(":", 1)[0] and ":" in line]
    return (causes[-1] if causes else lines[-1] if lines else text)[:500]


# --- The search ---------------------------------------------------------------------------------


def _trial_dirname(trial) -> str:
    return f"trial-{trial.trial_id}"  # Tune's default embeds every parameter in the name


def experiment_dir(space: SearchSpace) -> str:
    """<storage.path>/<storage.name>: an absolute local folder or a gs:// URI."""
    return storage.join(storage.absolute(space.storage.path), space.storage.name)


def absolute_paths(cfg: Config) -> Config:
    """Trials run in other processes (and folders, and nodes): no relative paths."""
    cfg = cfg.model_copy(deep=True)
    if cfg.dataset.root:
        cfg.dataset.root = storage.absolute(cfg.dataset.root)
    if cfg.dataset.cache_dir:
        cfg.dataset.cache_dir = storage.absolute(cfg.dataset.cache_dir)
    if cfg.model.pretrained_weights:
        cfg.model.pretrained_weights = storage.absolute(cfg.model.pretrained_weights)
    return cfg


def ensure_dataset(space: SearchSpace, cfg: Config) -> int:
    """Generate the synthetic set on first use (locally, or pushed to its bucket); return the
    number of training samples."""
    root = cfg.dataset.root
    synthetic = space.base.synthetic
    if synthetic and not storage.exists(storage.join(root, cfg.dataset.train_split)):
        log.info("generating a synthetic dataset in %s (%d + %d frames)", root, synthetic.train, synthetic.val)
        _generate_synthetic(
            root, {cfg.dataset.train_split: synthetic.train, cfg.dataset.val_split: synthetic.val}, synthetic.seed
        )
    index = read_split(
        storage.fetch_dataset(root, cfg.dataset.cache_dir), cfg.dataset.train_split, cfg.estimator.label_name
    )
    return len(index.head(cfg.train.sample_size))


def _generate_synthetic(root: str, splits: dict[str, int], seed: int) -> None:
    import tempfile

    from posetune.datasets import push_dataset
    from posetune.synth import generate

    if storage.is_local(root):
        generate(storage.local_path(root, "dataset.root"), splits, seed=seed, overwrite=False)
        return
    with tempfile.TemporaryDirectory(prefix="posetune-synth-") as scratch:
        generate(Path(scratch), splits, seed=seed, overwrite=False)
        push_dataset(scratch, root, overwrite=True)


def _fingerprint(space: SearchSpace, base: Config) -> str:
    blob = json.dumps(
        {"space": space.model_dump(mode="json", exclude={"storage"}), "base": base.to_dict()}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def describe_plan(space: SearchSpace, base: Config, plan: ResourcePlan | None) -> list[str]:
    """What --dry-run prints: the resolved space, the trial count and the resource plan."""
    s, r = space.search, space.resources
    lines = [f"search space ({len(space.parameters)} parameters):"]
    width = max(len(k) for k in space.parameters)
    lines += [f"  {key.ljust(width)}  {describe_parameter(p)}" for key, p in space.parameters.items()]
    if EFFECTIVE_BATCH in space.parameters:
        lines.append(f"  ({EFFECTIVE_BATCH} = batch_size x accumulation_steps x workers; accumulation is derived)")
    lines += [
        f"base: backbone {base.model.backbone}, image {base.dataset.image_scale}, data {base.dataset.root}",
        f"trials: {s.num_samples} ({s.searcher} searcher, seed {s.seed}, {len(s.points_to_evaluate)} initial point(s))",
        f"objective: {s.resolved_mode} {s.metric}",
        f"ASHA on samples seen: budget {s.asha.max_samples:,}, grace {s.asha.grace_samples:,}, "
        f"reduction factor {s.asha.reduction_factor:g}",
        f"per trial: {r.workers_per_trial} worker(s) x {r.cpus_per_worker:g} CPU"
        + (f" x {plan.gpus_per_worker:g} GPU" if plan and plan.use_gpu else ""),
    ]
    if plan:
        lines.append(f"cluster: {plan.cluster} -> {plan.concurrency} concurrent trial(s)")
        lines += [f"  note: {note}" for note in plan.notes]
    lines.append(f"experiment folder: {experiment_dir(space)}")
    return lines


def run_search(
    space: SearchSpace, base: Config, *, resume: bool = False, listeners: Sequence[Listener] = ()
) -> SearchSummary:
    """Run (or resume) the search; return its summary. The caller prints it.

    Every event goes to results.json first, then to ``listeners`` (tracking): ``SearchStarted``
    once every check has passed, just before the first trial (a listener may still refuse
    the search by raising), trial events as they happen, ``SearchEnded`` with the summary."""
    folder = experiment_dir(space)
    base = absolute_paths(base)
    fingerprint = _fingerprint(space, base)
    _check_experiment_folder(folder, space, fingerprint, resume)
    train_size = ensure_dataset(space, base)

    started_ray = connect_ray(space.resources.local_cpus)
    try:
        cluster = placement.cluster_shape()
        check_storage_reachable(space, folder, cluster)
        plan = plan_resources(space, cluster)
        for line in describe_plan(space, base, plan):
            log.info(line)
        setup = TrialSetup(space, base.to_dict(), train_size, plan, storage.join(folder, "train"))
        results = SearchResults(storage.join(folder, "results.json"), space.search.metric, space.search.resolved_mode)
        events = TrialEvents([results, *listeners], setup, folder)
        events.emit(SearchStarted(folder, resume))
        about = {"fingerprint": fingerprint, "metric": space.search.metric, "mode": space.search.resolved_mode}
        storage.write_text(storage.join(folder, "search.json"), json.dumps(about) + "\n")
        start = time.monotonic()
        interrupted = False
        try:
            _tuner(space, setup, folder, events, resume).fit()
        except KeyboardInterrupt:
            interrupted = True
        interrupted = interrupted or results.counts()[Outcome.RUNNING] > 0
        sweep_scratch_on_every_node()
        summary = _finish(space, setup, results, folder, time.monotonic() - start, interrupted, plan.cluster)
        events.emit(SearchEnded(summary, load_study(folder)))
        return summary
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _tuner(space: SearchSpace, setup: TrialSetup, folder: str, events: TrialEvents, resume: bool) -> tune.Tuner:
    """A new Tuner, or the one Tune saved in the folder (its searcher state included)."""
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), setup.plan.driver)
    storage_path, filesystem = storage.ray_storage(folder)
    if resume:
        log.info("resuming %s", folder)
        tuner = tune.Tuner.restore(
            f"{storage_path}/{TUNE_FOLDER}",
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=filesystem,
        )
        internals.restored_run_config(tuner).callbacks = [events]  # the saved copy has no listeners
        return tuner
    run_config = tune.RunConfig(
        name=TUNE_FOLDER,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        callbacks=[events],
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=1),  # a crashed trial driver is retried once
    )
    s = space.search
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=s.metric,  # for ASHA; the searcher holds its own copy
            mode=s.resolved_mode,
            search_alg=build_searcher(space),
            scheduler=build_scheduler(space),
            num_samples=s.num_samples,
            max_concurrent_trials=setup.plan.concurrency,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=run_config,
    )


def _check_experiment_folder(folder: str, space: SearchSpace, fingerprint: str, resume: bool) -> None:
    """Refuse a new search over an existing one, or a resume of a missing or different one."""
    storage_path, filesystem = storage.ray_storage(folder)
    tune_folder = f"{storage_path}/{TUNE_FOLDER}"
    exists = storage.exists(storage.join(folder, TUNE_FOLDER)) and tune.Tuner.can_restore(
        tune_folder, storage_filesystem=filesystem
    )
    if resume and not exists:
        raise PosetuneError(f"no search to resume at {folder} (storage.path / storage.name or --name)")
    if not resume and exists:
        raise PosetuneError(f"{folder} already holds a search; continue it with --resume, or pick another --name")
    about = storage.join(folder, "search.json")
    if resume and storage.exists(about) and json.loads(storage.read_text(about))["fingerprint"] != fingerprint:
        raise ConfigError(
            f"the search space or base config changed since {folder} was started; "
            "resume with the same file and overrides, or start a new search with --name"
        )


def _finish(
    space: SearchSpace,
    setup: TrialSetup,
    results: SearchResults,
    folder: str,
    seconds: float,
    interrupted: bool,
    cluster: str,
) -> SearchSummary:
    """Export the best trial (its config and best checkpoint) and write the summary. A best
    checkpoint that cannot be read is a problem listed in the summary, never a silent gap."""
    best = results.best()
    best_config = best_config_file = best_checkpoint = None
    problems = []
    if best and best.checkpoint:
        best_config = build_trial_config(setup, best.params)
        best_config.system.out_dir = None
        best_config.checkpoint.resume = None
        best_config.system.progress = True
        best_config_file = storage.join(folder, "best_config.yaml")
        storage.write_text(best_config_file, best_config.to_yaml())
        try:
            storage.copy(storage.join(best.checkpoint, "best.pt"), storage.join(folder, "best", "model.pt"))
            best_checkpoint = storage.join(folder, "best", "model.pt")
        except PosetuneError as exc:
            problems.append(f"the best trial's checkpoint could not be exported: {exc}")
    elif best:
        problems.append(f"the best trial {best.id} reported no checkpoint; nothing was exported")
    summary = SearchSummary(
        experiment_dir=folder,
        records=results.ranked(),
        counts=results.counts(),
        seconds=seconds,
        metric=space.search.metric,
        mode=space.search.resolved_mode,
        best_config=best_config,
        best_config_file=best_config_file,
        best_checkpoint=best_checkpoint,
        interrupted=interrupted,
        cluster=cluster,
        problems=problems,
    )
    storage.write_text(storage.join(folder, "summary.txt"), "\n".join(summary_lines(summary)) + "\n")
    return summary


def load_study(folder: str):
    """The search's Optuna study, from the searcher state Tune saved last (also after a resume)."""
    import pickle

    tune_folder = storage.join(folder, TUNE_FOLDER)
    states = sorted(name for name in storage.list_files(tune_folder) if name.startswith("searcher-state-"))
    if not states:
        return None
    return internals.study_in_saved_state(pickle.loads(storage.read_bytes(storage.join(tune_folder, states[-1]))))
