"""`posetune search`: Ray Tune over trials that each fit a Ray Train TorchTrainer.

The search checks its folder, data and cluster, plans resources (cluster.placement), runs
Tune with the searcher and scheduler of search.searchers, turns Tune's trial callbacks into
plain trial events for its listeners (results.json, tracking) and exports the best trial.

Experiment folder ``<storage.path>/<storage.name>/``:
    tune/                   Ray Tune's experiment state and trial folders
    train/<trial id>/       Ray Train runs: each trial's checkpoints (last.pt + its best.pt)
    search.json             what was searched (to refuse a --resume with a different space)
    results.json            {"trials": [...]}, updated live (search.results)
    best_config.yaml        the best trial's config; `posetune train --config` accepts it
    best/model.pt           the best trial's best checkpoint
    summary.txt             the final table
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import ray
from ray import tune

from posetune import internals, storage
from posetune.cluster import placement
from posetune.cluster.placement import ClusterShape, ResourcePlan
from posetune.config import Config
from posetune.data.fetch import fetch_dataset
from posetune.data.perception import read_split
from posetune.data.tools import synthesize
from posetune.errors import ConfigError, PosetuneError
from posetune.search import legacy
from posetune.search.events import (
    REPORTED,
    Listener,
    Outcome,
    SearchEnded,
    SearchEvent,
    SearchStarted,
    TrialEnded,
    TrialReported,
    TrialStarted,
)
from posetune.search.results import SearchResults, SearchSummary, experiment_dir, summary_lines
from posetune.search.searchers import MODEL_BASED, build_scheduler, build_search_alg
from posetune.search.space import EFFECTIVE_BATCH, SearchSpace, describe_parameter, eval_milestone, used_values
from posetune.search.trial import (
    TrialSetup,
    build_trial_config,
    release_training_slot,
    run_trial,
    start_training_slots,
    sweep_scratch_on_every_node,
)

log = logging.getLogger(__name__)

# Tune's experiment lives in its own subfolder: on a resume Tune downloads that folder and
# syncs it back at every checkpoint, which would overwrite live files kept beside its own.
TUNE_FOLDER = "tune"


# --- Resources ---------------------------------------------------------------------------------


def plan_resources(space: SearchSpace, cluster: ClusterShape) -> ResourcePlan:
    """The search's resource plan on this cluster (see cluster.placement)."""
    r, s = space.resources, space.search
    return placement.plan_resources(
        workers_per_trial=r.workers_per_trial,
        cpus_per_worker=r.cpus_per_worker,
        gpus_per_worker=r.gpus_per_worker,
        num_samples=s.num_samples,
        max_concurrent_trials=s.max_concurrent_trials,
        cluster=cluster,
    )


# --- Trial events -------------------------------------------------------------------------------


def trial_outcome(result: dict[str, Any], budget: int) -> Outcome:
    """How a trial that Tune completed ended, from its last result."""
    if result.get("diverged"):
        return Outcome.DIVERGED
    return Outcome.COMPLETED if result.get("samples_seen", 0) >= budget else Outcome.STOPPED_EARLY


class TrialEvents(tune.Callback):
    """The search's one Tune callback: Tune's trial callbacks as posetune's plain trial events
    (search.events), sent to every listener in order."""

    def __init__(self, listeners: Sequence[Listener], setup: TrialSetup, folder: str):
        # Not `self.setup`: that is a Tune callback method.
        self.listeners, self.trial_setup, self.folder = list(listeners), setup, folder
        # Trial id -> when it (re)started, and when its first worker group started: its
        # resource-hours count from there (the wait for workers, e.g. a GPU node booting, holds
        # nothing; a wait after a worker restart is counted).
        self.started: dict[str, float] = {}
        self.workers_started: dict[str, float] = {}
        # Trial id -> its latest checkpoint: a diverged trial's last report carries none, and its
        # best.pt (from before it diverged) still belongs in its record and MLflow run.
        self.checkpoints: dict[str, str] = {}
        self.used: dict[str, dict[str, Any]] = {}  # trial id -> its searched values as used

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into the experiment; listeners hold files, threads and
        # clients of this process, and a restored search attaches the live ones again.
        return {**self.__dict__, "listeners": []}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"workers_started": {}, "checkpoints": {}, **state})  # saved before they existed

    def emit(self, event: SearchEvent) -> None:
        ended_before = self.trial_setup.finished.keys() | self.trial_setup.failed.keys()
        if getattr(event, "trial_id", None) in ended_before:
            return  # ended in an earlier run of the search: its record and run are final
        for listener in self.listeners:
            listener.on_event(event)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.time()
        self.workers_started.pop(trial.trial_id, None)
        config = build_trial_config(self.trial_setup, dict(trial.config))
        self.emit(TrialStarted(trial.trial_id, self._used(trial, config), config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("diverged"):  # the trial ends next, as diverged
            return
        if trial.trial_id in self.started and "workers_started_at" in result:
            self.workers_started.setdefault(trial.trial_id, float(result["workers_started_at"]))
        metrics = {key: float(result[key]) for key in REPORTED if key in result}
        samples = int(result["samples_seen"])
        checkpoint = self._checkpoint(result)
        if checkpoint:
            self.checkpoints[trial.trial_id] = checkpoint
        self.emit(TrialReported(trial.trial_id, self._used(trial), samples, metrics, checkpoint))

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
        latest = self.checkpoints.pop(trial.trial_id, None)
        checkpoint = self._checkpoint(result) or latest
        hours = self._resource_hours(trial.trial_id)
        release_training_slot(self.trial_setup.slots, trial.trial_id)
        self.emit(TrialEnded(trial.trial_id, self._used(trial), outcome, samples, error, checkpoint, hours))

    def _used(self, trial, config: Config | None = None) -> dict[str, Any]:
        """The trial's searched values as its config uses them (what results.json records)."""
        if trial.trial_id not in self.used:
            config = config or build_trial_config(self.trial_setup, dict(trial.config))
            self.used[trial.trial_id] = used_values(self.trial_setup.space, config, dict(trial.config))
        return self.used[trial.trial_id]

    def _resource_hours(self, trial_id: str) -> dict[str, float]:
        """Its workers' bundles times the wall time since its workers started (or, when none
        reported, since the trial (re)started)."""
        started = self.started.pop(trial_id, None)
        started = self.workers_started.pop(trial_id, started)
        if started is None:
            return {}
        hours = max(0.0, time.time() - started) / 3600
        workers = self.trial_setup.space.resources.workers_per_trial
        return {name: amount * workers * hours for name, amount in self.trial_setup.plan.worker.items() if amount}

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
        splits = {cfg.dataset.train_split: synthetic.train, cfg.dataset.val_split: synthetic.val}
        # Local splits that exist are never replaced; a bucket without the train split holds no
        # usable dataset (at most an interrupted upload) and is replaced.
        synthesize(root, splits, synthetic.seed, overwrite=not storage.is_local(root))
    # A folder in a bucket is counted where it is (labels only; the training nodes fetch their
    # own copies); a .zip is one object and is fetched.
    if storage.is_local(root) or root.lower().endswith(".zip"):
        root = str(fetch_dataset(root, cfg.dataset.cache_dir))
    index = read_split(root, cfg.dataset.train_split, cfg.estimator.label_name)
    return len(index.head(cfg.train.sample_size))


# search.asha keys added after searches were saved: they count only when set away from their
# defaults, so a search saved before them still resumes (its fingerprint is unchanged).
ASHA_KEYS_ADDED_LATER = ("brackets", "rung_correlation", "rung_evidence")


def _fingerprint(space: SearchSpace, base: Config) -> str:
    # Where results go, what compute costs and which node types the cluster may start may
    # change between runs of one search (and searches saved before those keys resume).
    dumped = space.model_dump(
        mode="json", exclude={"storage": True, "resources": {"prices", "node_types", "max_workers"}}
    )
    asha = dumped["search"]["asha"]
    for key in ASHA_KEYS_ADDED_LATER:
        if asha[key] == type(space.search.asha).model_fields[key].default:
            del asha[key]
    blob = json.dumps({"space": dumped, "base": base.to_dict()}, sort_keys=True)
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
        f"trials: {s.num_samples} ({s.searcher} searcher, seed {s.seed}, {len(s.points_to_evaluate)} initial point(s)"
        + (f", {s.resolved_startup_trials} random start-up trial(s))" if s.searcher in MODEL_BASED else ")"),
        f"objective: {s.resolved_mode} {s.metric}",
        (
            f"ASHA on samples seen: budget {s.asha.max_samples:,}, rungs at "
            + ", ".join(f"{rung:,.0f}" for rung in s.asha.rungs())
            + f" (reduction factor {s.asha.reduction_factor:g}"
            + (f", {s.asha.brackets} brackets" if s.asha.brackets > 1 else "")
            + (
                f"; a rung stops trials once it ranks {s.asha.rung_evidence} finished trials with "
                f"Spearman >= {s.asha.rung_correlation:g})"
                if s.asha.rung_correlation is not None
                else ")"
            )
            if s.scheduler == "asha"
            else f"no early stopping (fifo): every trial trains {s.asha.max_samples:,} samples"
        ),
        f"evaluations every {eval_milestone(space, base):,} samples, the same for every trial",
        f"per trial: {r.workers_per_trial} worker(s) x {r.cpus_per_worker:g} CPU"
        + (f" x {plan.gpus_per_worker:g} GPU" if plan and plan.use_gpu else ""),
    ]
    if r.prices:
        lines.append("prices per resource-hour: " + ", ".join(f"{k} {v:g}" for k, v in sorted(r.prices.items())))
    if plan:
        lines.append(f"cluster: {plan.cluster}")
        lines.append(
            f"trials at once: {plan.fit_now} on the nodes up now, {plan.concurrency} once scaled"
            if plan.fit_now < plan.concurrency
            else f"trials at once: {plan.concurrency}"
        )
        lines.append(f"trial drivers: {placement.describe_driver(plan.driver)}")
        lines += [f"  note: {note}" for note in plan.notes]
    lines.append(f"experiment folder: {experiment_dir(space)}")
    return lines


def check_paths(space: SearchSpace, base: Config, cluster: ClusterShape) -> None:
    """Every path a trial reads or writes must reach its workers on every node."""
    paths = {
        "storage.path": space.storage.path,
        "dataset.root": base.dataset.root,
        "model.pretrained_weights": base.model.pretrained_weights,
    }
    placement.check_paths_shared(paths, space.storage.shared, cluster)


def plan_search(space: SearchSpace, base: Config) -> list[str]:
    """What `posetune search --dry-run` prints: the resolved space, the trial count and the
    resource plan. On a reachable cluster (RAY_ADDRESS, or one on this node such as a `ray up`
    head) the plan is the one the search would use there, node types the autoscaler may start
    included; otherwise it is for this machine, and says so. Starts no Ray instance and no trial."""
    if not placement.cluster_reachable():
        lines = describe_plan(space, base, plan_resources(space, placement.local_shape()))
        return [*lines, "no Ray cluster is reachable (RAY_ADDRESS, or one on this node): the plan is for this machine"]
    joined = not ray.is_initialized()  # a Python caller's own Ray session stays as it was
    placement.connect_ray()
    try:
        cluster = placement.cluster_shape(space.resources.autoscaler())
        check_paths(space, base, cluster)  # refused there, so refused here
        return describe_plan(space, base, plan_resources(space, cluster))
    finally:
        if joined:
            ray.shutdown()


def run_search(
    space: SearchSpace,
    base: Config,
    *,
    resume: bool = False,
    retry_failed: bool = False,
    listeners: Sequence[Listener] = (),
) -> SearchSummary:
    """Run (or resume) the search; return its summary. The caller prints it.

    Every event goes to results.json first, then to ``listeners`` (tracking): ``SearchStarted``
    once every check has passed, just before the first trial (a listener may still refuse
    the search by raising), trial events as they happen, ``SearchEnded`` with the summary.
    On a resume, trials that ended keep their record (Tune may restart one whose end it had
    not saved: it re-reports its end without training, and no event is sent); failed trials
    stay failed unless ``retry_failed``."""
    folder = experiment_dir(space)
    base = absolute_paths(base)
    fingerprint = _fingerprint(space, base)
    resume = _check_experiment_folder(folder, space, fingerprint, resume)
    train_size = ensure_dataset(space, base)

    started_ray = placement.connect_ray(space.resources.local_cpus)
    slots_actor = None
    try:
        internals.start_train_autoscaling_coordinator()
        cluster = placement.cluster_shape(space.resources.autoscaler())
        check_paths(space, base, cluster)
        plan = plan_resources(space, cluster)
        for line in describe_plan(space, base, plan):
            log.info(line)
        s = space.search
        results_file = storage.join(folder, "results.json")
        results = SearchResults(results_file, s.metric, s.resolved_mode, space.resources.prices, resume)
        train = storage.join(folder, "train")
        finished = results.finished() if resume else {}
        failed = results.failed() if resume and not retry_failed else {}
        slots = f"posetune-slots-{uuid.uuid4().hex[:12]}"
        slots_actor = start_training_slots(slots, plan.concurrency)
        setup = TrialSetup(space, base.to_dict(), train_size, plan, train, finished, failed, slots)
        events = TrialEvents([results, *listeners], setup, folder)
        events.emit(SearchStarted(folder, resume))
        about = {"fingerprint": fingerprint, "metric": space.search.metric, "mode": space.search.resolved_mode}
        storage.write_text(storage.join(folder, "search.json"), json.dumps(about) + "\n")
        start = time.monotonic()
        interrupted = False
        try:
            _tuner(space, setup, folder, events, resume, retry_failed).fit()
        except KeyboardInterrupt:
            interrupted = True
        interrupted = interrupted or results.counts()[Outcome.RUNNING] > 0
        sweep_scratch_on_every_node()
        summary = _finish(space, setup, results, folder, time.monotonic() - start, interrupted, plan.cluster)
        events.emit(SearchEnded(summary, load_study(folder)))
        return summary
    finally:
        if slots_actor is not None:
            ray.kill(slots_actor)
        if started_ray:
            ray.shutdown()


def _tuner(
    space: SearchSpace, setup: TrialSetup, folder: str, events: TrialEvents, resume: bool, retry_failed: bool
) -> tune.Tuner:
    """A new Tuner, or the one Tune saved in the folder (its searcher state included)."""
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), setup.plan.driver)
    storage_path, filesystem = storage.ray_storage(folder)
    if resume:
        log.info("resuming %s", folder)
        legacy.alias_flat_layout()  # a search started before the package layout pickled the old names
        tuner = tune.Tuner.restore(
            f"{storage_path}/{TUNE_FOLDER}",
            trainable,
            resume_unfinished=True,
            resume_errored=retry_failed,  # failed trials stay failed unless asked
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
            # The limit is in the search algorithm, not max_concurrent_trials: Tune's own
            # ConcurrencyLimiter would drop the ends of trials a --retry-failed resume reruns.
            search_alg=build_search_alg(space, setup.plan.concurrency),
            scheduler=build_scheduler(space),
            num_samples=s.num_samples,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=run_config,
    )


def _check_experiment_folder(folder: str, space: SearchSpace, fingerprint: str, resume: bool) -> bool:
    """Whether the search resumes one saved in the folder. A new search over an existing one,
    or a resume of a different one, is refused; ``--resume`` with no search there yet starts it,
    so a retried job (a RayJob retry, a re-applied job) continues instead of failing."""
    storage_path, filesystem = storage.ray_storage(folder)
    tune_folder = f"{storage_path}/{TUNE_FOLDER}"
    exists = storage.exists(storage.join(folder, TUNE_FOLDER)) and tune.Tuner.can_restore(
        tune_folder, storage_filesystem=filesystem
    )
    if resume and not exists:
        log.info("no search to resume at %s yet: starting it", folder)
        return False
    if not resume and exists:
        raise PosetuneError(f"{folder} already holds a search; continue it with --resume, or pick another --name")
    about = storage.join(folder, "search.json")
    if resume and storage.exists(about) and json.loads(storage.read_text(about))["fingerprint"] != fingerprint:
        raise ConfigError(
            f"the search space or base config changed since {folder} was started; "
            "resume with the same file and overrides, or start a new search with --name"
        )
    return resume


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
    unwritten = results.flush()
    if unwritten:
        problems.append(f"results.json does not hold the search's last state: {unwritten}")
    if best and best.checkpoint:
        best_config = build_trial_config(setup, best.params)
        # `posetune train` is one process: W workers' batches become W x the accumulation steps,
        # so it trains with the trial's effective batch (and optimizer steps per epoch).
        best_config.train.accumulation_steps *= setup.space.resources.workers_per_trial
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
        compute=results.compute(),
        problems=problems,
    )
    storage.write_text(storage.join(folder, "summary.txt"), "\n".join(summary_lines(summary)) + "\n")
    return summary


def load_study(folder: str):
    """The search's Optuna study, from the searcher state Tune saved last (also after a resume)."""
    tune_folder = storage.join(folder, TUNE_FOLDER)
    states = sorted(name for name in storage.list_files(tune_folder) if name.startswith("searcher-state-"))
    if not states:
        return None
    return internals.study_in_saved_state(legacy.loads(storage.read_bytes(storage.join(tune_folder, states[-1]))))
