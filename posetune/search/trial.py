"""One search trial: a Ray Tune function that fits a Ray Train ``TorchTrainer``.

Tune calls ``run_trial`` (the trial driver; it holds only a sliver of a CPU). It builds the
trial's Config and a TorchTrainer whose workers run ``train_worker``: ``posetune.train.loop.fit``
with Ray Train's rank, world size and device (Ray Train sets up torch.distributed, so DDP and
the distributed sampler follow). At every evaluation each rank reports the metrics and
samples seen; rank 0 attaches a snapshot of the run's checkpoint folder (last.pt plus the
trial's best.pt), which Ray Train uploads in the background while training goes on.

Failures: a worker that dies is restarted by Ray Train from the latest reported checkpoint
(``FailureConfig.max_failures``); a worker group that cannot start is retried a bounded number
of times and then fails the trial with Ray's message, rather than waiting forever.

Concurrency: a trial trains only while it holds one of the search's ``TrainingSlots``, so no
more trials train (and ask the autoscaler for nodes) at once than the plan allows, whatever
Tune restarts together.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from posetune import storage
from posetune.choices import diverged_result
from posetune.cluster.placement import ResourcePlan
from posetune.config import Config, config_from_dict
from posetune.search.space import SearchSpace, eval_milestone, trial_config

WORKER_RESTARTS = 2  # per trial, from the latest checkpoint
CONTROLLER_RETRIES = 2  # worker-group start failures (e.g. resources never free) before giving up
SCRATCH_PREFIX = "posetune-trial-"  # per-worker scratch folders: <tmp>/posetune-trial-<pid>-*
SCRATCH_OWNERS_EXIT_S = 10.0  # the end of a search waits this long for its killed workers to exit


@dataclass
class TrialSetup:
    """What every trial driver needs besides its sampled parameters (pickled once by Ray)."""

    space: SearchSpace
    base: dict[str, Any]  # the base config, paths made absolute
    train_size: int  # training samples, to turn the sample budget into epochs
    plan: ResourcePlan  # each worker's bundle, GPUs, how long to wait for resources
    train_storage: str  # where Ray Train keeps each trial's checkpoints (folder or gs://)
    # Trials that ended in an earlier run of this search -> their final result. Tune restarts
    # such a trial after a resume when its saved state predates the end; it is not re-run.
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Trials that failed in an earlier run -> their error, unless the resume retries them. Tune
    # restarts one whose failure came after its last snapshot: it fails again at once.
    failed: dict[str, str] = field(default_factory=dict)
    slots: str | None = None  # the name of the search's TrainingSlots actor (None: no limit)


class TrainingSlots:
    """At most ``limit`` trials train at once (a Ray actor on the search driver's node).

    Tune's concurrency limit gates only the trials its searcher suggests. A ``--retry-failed``
    resume restarts every failed trial at once, and Tune starts each as soon as resources
    allow: on an autoscaling cluster, nodes for all of them. A trial's driver waits here for a
    slot, holding nothing but its own sliver of a CPU; a slot is keyed by trial id, so a
    restarted driver takes its own slot back, and the search frees it when the trial ends."""

    def __init__(self, limit: int):
        self.limit = limit
        self.holders: set[str] = set()

    def acquire(self, trial_id: str) -> bool:
        if trial_id in self.holders or len(self.holders) < self.limit:
            self.holders.add(trial_id)
            return True
        return False

    def release(self, trial_id: str) -> None:
        self.holders.discard(trial_id)


SLOT_POLL_S = 2.0


def start_training_slots(name: str, limit: int):
    """The search's TrainingSlots actor, on this (the driver's) node: never on a worker node
    that a preemption or a scale-down takes away. Dies with the search's driver."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(TrainingSlots).options(name=name, num_cpus=0, scheduling_strategy=here)
    return actor.remote(limit)


def release_training_slot(name: str | None, trial_id: str) -> None:
    """Free an ended trial's slot (its driver may have died holding it)."""
    import ray

    if name:
        ray.get_actor(name).release.remote(trial_id)


@contextmanager
def training_slot(name: str | None, trial_id: str) -> Iterator[None]:
    """Hold one of the search's training slots while the body runs (waits for one first)."""
    if not name:
        yield
        return
    import ray

    slots = ray.get_actor(name)
    while not ray.get(slots.acquire.remote(trial_id)):
        time.sleep(SLOT_POLL_S)
    try:
        yield
    finally:
        slots.release.remote(trial_id)


class FailedBefore(RuntimeError):
    """A trial that failed before the resume, restarted by Tune: it stays failed."""


def epochs_for_budget(cfg: Config, train_size: int, workers: int, max_samples: int) -> int:
    """Enough epochs for the ASHA budget: a trial that is never stopped sees max_samples."""
    per_epoch = (train_size // (cfg.train.batch_size * workers)) * cfg.train.batch_size * workers
    return max(1, math.ceil(max_samples / max(1, per_epoch)))


def build_trial_config(setup: TrialSetup, params: dict[str, Any]) -> Config:
    return budget_config(setup.space, config_from_dict(setup.base), setup.train_size, params)


def budget_config(space: SearchSpace, base: Config, train_size: int, params: dict[str, Any]) -> Config:
    """The Config a trial trains: sampled values on the base, the search's sample budget and
    evaluation milestones, its metric picking best.pt."""
    cfg = trial_config(space, base, params)
    workers, budget = space.resources.workers_per_trial, space.search.asha.max_samples
    cfg.train.epochs = epochs_for_budget(cfg, train_size, workers, budget)
    cfg.train.max_samples = budget  # ends at the budget exactly, mid-epoch if need be
    cfg.val.eval_every_samples = eval_milestone(space, base)  # the milestones every trial shares
    cfg.checkpoint.monitor = space.search.metric  # best.pt: the trial's best by the search's metric
    cfg.system.progress = False
    return cfg


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable: fit this trial's TorchTrainer (Ray Train V2 pattern)."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    if trial_id in setup.finished:  # ended before the resume: say again how, train nothing
        ray.tune.report(setup.finished[trial_id])
        return
    if trial_id in setup.failed:
        raise FailedBefore(f"failed before the resume (--retry-failed runs it again): {setup.failed[trial_id]}")
    cfg = build_trial_config(setup, params)
    plan = setup.plan
    # Ray Train waits this long for the workers' resources before retrying: on an autoscaling
    # cluster long enough for a GPU node to start. Read from the environment by Train's
    # controller, which inherits this process's.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(plan.start_timeout_s)
    storage_path, filesystem = storage.ray_storage(setup.train_storage)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "metric": setup.space.search.metric,
            "train_storage": setup.train_storage,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=setup.space.resources.workers_per_trial,
            use_gpu=plan.use_gpu,
            resources_per_worker=plan.worker,
        ),
        run_config=ray.train.RunConfig(
            # One name per trial: a restarted trial finds and resumes its own Train run.
            name=trial_id,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=setup.space.storage.keep_checkpoints),
            failure_config=ray.train.FailureConfig(
                max_failures=WORKER_RESTARTS, controller_failure_limit=CONTROLLER_RETRIES
            ),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # the search prints progress
        ),
    )
    with training_slot(setup.slots, trial_id):
        trainer.fit()


def train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: fit() on this rank, reporting every evaluation to Ray."""
    import ray.train
    import ray.train.torch
    from ray.train import CheckpointUploadMode

    # Imported here, not at the top: the trial driver and Train's controller load this module
    # too, and neither trains (torchvision alone is ~1.5 s of every trial's start on 2 cores).
    from posetune.train.loop import TrainingDiverged, fit

    # The driver prints progress. Ray Train logs every report at INFO through a logger named
    # after its source file, which its LoggingConfig does not reach: quiet the root logger.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("posetune").setLevel(logging.WARNING)
    workers_started_at = time.time()  # resource-hours count from here, not from the wait for workers
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    cfg = config_from_dict(loop_config["config"])
    sweep_scratch()  # of workers on this node that were killed (a stopped trial's finally never runs)
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
    cfg.system.out_dir = str(scratch / "run")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group: continue from the latest report
        local = scratch / "run" / "checkpoints"
        # Through posetune's storage rather than checkpoint.as_directory(): pyarrow's GCS
        # download of a large object stalls against the GCS emulator the tests run on, and
        # google-cloud-storage checks each file's CRC32C.
        storage.download_tree(storage.from_ray_path(loop_config["train_storage"], checkpoint.path), local)
        cfg.checkpoint.resume = str(local / "last.pt")

    reported = []
    blocked = [0.0]  # seconds the previous report held training up (the benchmark's breakdown)

    def report(evaluation) -> None:
        start = time.perf_counter()
        metrics = {
            **evaluation.metrics,
            "samples_seen": evaluation.samples_seen,
            "epoch": evaluation.epoch,
            "train_loss": evaluation.train_loss,
            "train_images_per_s": evaluation.train_images_per_s,
            "workers_started_at": workers_started_at,
            "report_s": blocked[0],
            "reported_at": time.time(),
        }
        # Uploaded in the background (Ray Train's asynchronous mode): training goes on while
        # the checkpoint is copied to storage, and Ray registers it (and Tune sees this
        # result) once it is complete there. fit() rewrites last.pt at the next evaluation,
        # so Ray gets a snapshot of the folder, which it deletes after the upload.
        attached = ray.train.Checkpoint.from_directory(snapshot(evaluation.checkpoint_dir)) if rank == 0 else None
        ray.train.report(metrics, checkpoint=attached, checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
        reported.append(evaluation.samples_seen)
        blocked[0] = round(time.perf_counter() - start, 4)

    try:
        result = fit(
            cfg,
            device=ray.train.torch.get_device(),
            rank=rank,
            world_size=world_size,
            on_evaluation=report,
            progress=False,
        )
        if checkpoint is not None and not reported and result.history:
            # Restored at its final checkpoint (Tune re-ran a trial that had finished after its
            # state was last saved): nothing was left to train, so say again how it ended.
            last = result.history[-1]
            folder = Path(cfg.system.out_dir) / "checkpoints"
            attached = ray.train.Checkpoint.from_directory(folder) if rank == 0 else None
            ray.train.report(last, checkpoint=attached)
    except TrainingDiverged as exc:
        # Every rank detects divergence at the same step (it is all-reduced), so every rank
        # reports once more: ASHA gets NaN (ignored by its cut-offs), the searcher tells Optuna
        # PRUNED with the worst score (posetune.search.searchers), and the trial ends diverged.
        ray.train.report(diverged_result(loop_config["metric"], str(exc), exc.samples_seen))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- Scratch folders --------------------------------------------------------------------------


def snapshot(folder: Path) -> Path:
    """A copy of a checkpoint folder as it is now, by hard links (no bytes copied): checkpoint
    files are replaced whole when rewritten (storage.write_bytes), so the links keep this
    version. A scratch folder of this process, swept like the others if the process dies."""
    copy = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-report-"))
    for file in folder.iterdir():
        if not file.is_file() or file.name.startswith("."):  # a write in progress (storage.atomic_path)
            continue
        try:
            os.link(file, copy / file.name)
        except OSError:  # another file system, or one without hard links
            shutil.copy2(file, copy / file.name)
    return copy


def sweep_scratch(wait_s: float = 0.0) -> int:
    """Remove this node's trial scratch folders whose worker process is gone. A worker that
    ASHA stops (or that fails) is killed without running its clean-up, so the next worker on
    the node and the end of the search clean up after it. ``wait_s``: how long to wait for
    owners still alive to exit (at the end of a search its last stopped trial's worker may
    still be dying). Returns the folders removed."""
    owners: dict[int, list[Path]] = {}
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        pid = folder.name.removeprefix(SCRATCH_PREFIX).split("-", 1)[0]
        if pid.isdigit():
            owners.setdefault(int(pid), []).append(folder)
    deadline = time.monotonic() + wait_s
    while any(_alive(pid) for pid in owners) and time.monotonic() < deadline:
        time.sleep(0.2)
    gone = [folder for pid, folders in owners.items() if not _alive(pid) for folder in folders]
    for folder in gone:
        shutil.rmtree(folder, ignore_errors=True)
    return len(gone)


def _alive(pid: int) -> bool:
    """Whether the process runs (a killed worker its parent has not reaped yet does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def sweep_scratch_on_every_node() -> int:
    """sweep_scratch on each live node of the cluster: here for this process's node, one tiny
    task pinned to each other node (a task on a local instance was a worker start, seconds
    at the end of every search on 2 cores)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    task = ray.remote(num_cpus=0)(sweep_scratch)
    pending = [
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
            SCRATCH_OWNERS_EXIT_S
        )
        for node in ray.nodes()
        if node.get("Alive") and node["NodeID"] != here
    ]
    try:
        return sweep_scratch(SCRATCH_OWNERS_EXIT_S) + sum(ray.get(pending, timeout=60))
    except Exception as exc:  # clean-up must never fail a finished search
        logging.getLogger(__name__).warning("could not remove old trial scratch folders: %s", exc)
        return 0
