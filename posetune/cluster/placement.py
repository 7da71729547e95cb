"""Where trials run: how many fit the cluster at once, what each asks Ray for, where its
driver goes.

A trial is one driver (Tune's function plus the Ray Train controller: it only waits) and
``workers_per_trial`` worker bundles of ``{CPU: c, GPU: g}``. Ray places each bundle on one
node, so the plan packs bundles onto *nodes*, never onto cluster totals: three 4-CPU nodes hold
three 3-CPU workers (one each), not the four that 12 CPUs suggest. With an autoscaler the plan
packs onto the largest cluster it may grow to for these workers (the node types that hold them,
each at its ``max_workers``, all within the cluster-wide cap; ``cluster/autoscaler.py`` says
where the node types are read); trials beyond what is up now wait for the autoscaler to start
nodes instead of failing.

Trial drivers ask for the custom resource ``posetune_driver`` when any node offers it: a
cluster file gives it to the head and to non-preemptible nodes (``cluster/gcp.yaml`` does), so
a preempted spot GPU node costs a worker restart from the trial's checkpoint, never the trial.
Without it, drivers go to the head node (Ray's ``node:__internal_head__`` resource).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from posetune import internals, storage
from posetune.cluster.autoscaler import Autoscaler, find_autoscaler, format_resources
from posetune.errors import ConfigError

log = logging.getLogger(__name__)

DRIVER_RESOURCE = "posetune_driver"  # custom resource of nodes that may host trial drivers
HEAD_RESOURCE = "node:__internal_head__"  # Ray gives this (1.0) to the head node only
DRIVER_SHARE = 0.001  # of either resource per trial driver: a thousand drivers per unit
START_TIMEOUT_NOW_S = 120  # a worker group the cluster can hold now starts within this
START_TIMEOUT_AUTOSCALE_S = 1800  # time for an autoscaler to start a (GPU) node


@dataclass(frozen=True)
class Node:
    """One node, up now or one the autoscaler may start."""

    resources: dict[str, float]
    name: str = "node"

    @property
    def cpus(self) -> float:
        return self.resources.get("CPU", 0.0)

    @property
    def gpus(self) -> float:
        return self.resources.get("GPU", 0.0)


@dataclass
class ClusterShape:
    """The nodes up now and, with an autoscaler, the node types it may start."""

    up: list[Node]
    autoscaler: Autoscaler | None = None

    def largest_for(self, worker: dict[str, float]) -> list[Node]:
        """The nodes up plus every node the autoscaler may add for workers of this bundle.

        The cluster-wide cap (``max_workers``) bounds the nodes added, so the types that hold
        the most bundles per node come first, each up to its own maximum. A node up counts
        against its type's maximum when its CPUs and GPUs match the type's."""
        if self.autoscaler is None:
            return self.up
        room = self.autoscaler.max_workers - (len(self.up) - 1)  # the head is not a worker
        added: list[Node] = []
        by_yield = sorted(
            self.autoscaler.node_types, key=lambda t: -trials_that_fit([Node(t.resources)], worker, 1, 10**6)
        )
        for node_type in by_yield:
            if room <= 0:
                break
            if not _holds(node_type.resources, worker):
                continue
            running = sum(
                1 for n in self.up if HEAD_RESOURCE not in n.resources and _same_shape(n.resources, node_type.resources)
            )
            count = max(0, min(node_type.max_workers - running, room))
            added += [Node(node_type.resources, node_type.name)] * count
            room -= count
        return self.up + added

    @property
    def startable(self) -> list[Node]:
        """The nodes up and one of each type the autoscaler may start (none with a cap of 0)."""
        if self.autoscaler is None or self.autoscaler.max_workers <= 0:
            return self.up
        return self.up + [Node(t.resources, t.name) for t in self.autoscaler.node_types if t.max_workers > 0]

    @property
    def multi_node(self) -> bool:
        return len(self.up) > 1 or (self.autoscaler is not None and self.autoscaler.max_workers > 0)

    def describe(self) -> str:
        cpus, gpus = sum(n.cpus for n in self.up), sum(n.gpus for n in self.up)
        text = f"{len(self.up)} node(s), {cpus:g} CPUs, {gpus:g} GPUs up"
        if self.autoscaler is not None:
            text += f"; autoscaler: {self.autoscaler.describe()}"
        return text


def _same_shape(a: dict[str, float], b: dict[str, float]) -> bool:
    return all(abs(a.get(key, 0.0) - b.get(key, 0.0)) < 1e-9 for key in ("CPU", "GPU"))


@dataclass
class ResourcePlan:
    gpus_per_worker: float
    concurrency: int  # trials running at once (Tune's max_concurrent_trials)
    fit_now: int  # of those, how many the nodes up now hold
    worker: dict[str, float]  # one worker's bundle
    driver: dict[str, float]  # one trial driver's request
    start_timeout_s: float  # Ray Train's wait for a worker group's resources
    cluster: str
    notes: list[str] = field(default_factory=list)

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


def trials_that_fit(nodes: list[Node], worker: dict[str, float], workers: int, limit: int) -> int:
    """How many trials of `workers` bundles fit on these nodes at once, up to `limit`.

    Best fit: each bundle goes to the node it leaves least room on, so large nodes stay
    free for large trials. A trial is counted only when all its bundles fit."""
    free = [dict(node.resources) for node in nodes]
    count = 0
    while count < limit:
        trial = [dict(node) for node in free]
        for _ in range(workers):
            fits = [i for i, node in enumerate(trial) if _holds(node, worker)]
            if not fits:
                return count
            best = min(fits, key=lambda i: _slack(trial[i], worker))
            for key, amount in worker.items():
                trial[best][key] -= amount
        free = trial
        count += 1
    return count


def _holds(node: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(node.get(key, 0.0) + 1e-9 >= amount for key, amount in bundle.items())


def _slack(node: dict[str, float], bundle: dict[str, float]) -> tuple[float, float]:
    return (node.get("GPU", 0.0) - bundle.get("GPU", 0.0), node.get("CPU", 0.0) - bundle.get("CPU", 0.0))


def plan_resources(
    *,
    workers_per_trial: int,
    cpus_per_worker: float,
    gpus_per_worker: float | str,
    num_samples: int,
    max_concurrent_trials: int | None,
    cluster: ClusterShape,
) -> ResourcePlan:
    """The plan for a search on `cluster`; a ConfigError when no trial could ever be placed."""
    notes = []
    any_gpu = any(node.gpus > 0 for node in cluster.startable)  # up, or a type the autoscaler may start
    if gpus_per_worker == "auto":
        gpus = 1.0 if any_gpu else 0.0
        if not any_gpu:
            notes.append("no GPU on any node (or node type): trials train on CPU")
    else:
        gpus = float(gpus_per_worker)
    worker = {"CPU": cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    largest = cluster.largest_for(worker)
    fit_largest = trials_that_fit(largest, worker, workers_per_trial, num_samples)
    if fit_largest < 1:
        biggest = max(cluster.startable, key=lambda n: (n.gpus, n.cpus), default=Node({}))
        raise ConfigError(
            f"one trial needs {workers_per_trial} worker(s) of {format_resources(worker)} but no node can hold that "
            f"({cluster.describe()}; the largest node has {format_resources(biggest.resources)}): lower "
            "resources.workers_per_trial / cpus_per_worker / gpus_per_worker, or add a larger node type"
        )
    fit_now = trials_that_fit(cluster.up, worker, workers_per_trial, num_samples)
    concurrency = fit_largest
    if max_concurrent_trials is not None:
        concurrency = min(max_concurrent_trials, fit_largest)
        if max_concurrent_trials > fit_largest:
            where = "the largest the cluster may grow to" if cluster.autoscaler else "the nodes up"
            notes.append(
                f"search.max_concurrent_trials = {max_concurrent_trials}, but only {fit_largest} fit {where}: "
                f"capped at {fit_largest}"
            )
    if fit_now < concurrency:
        notes.append(f"{fit_now} trial(s) fit the nodes up now; the rest wait for the autoscaler")
    timeout = START_TIMEOUT_AUTOSCALE_S if cluster.autoscaler is not None else START_TIMEOUT_NOW_S
    return ResourcePlan(gpus, concurrency, fit_now, worker, driver_request(cluster), timeout, cluster.describe(), notes)


def driver_request(cluster: ClusterShape) -> dict[str, float]:
    """What one trial driver asks for: a share of posetune_driver when any node offers it
    (non-preemptible nodes), else of the head node's own resource. No CPU: it only waits."""
    if any(DRIVER_RESOURCE in node.resources for node in cluster.startable):
        return {DRIVER_RESOURCE: DRIVER_SHARE}
    return {HEAD_RESOURCE: DRIVER_SHARE}


def describe_driver(request: dict[str, float]) -> str:
    """Where a trial driver with this request runs, in words."""
    if DRIVER_RESOURCE in request:
        return f"on nodes with the {DRIVER_RESOURCE} resource (the head and non-preemptible nodes)"
    return "on the head node"


# --- Reading the cluster (Ray) ----------------------------------------------------------------


def cluster_shape(explicit: Autoscaler | None = None) -> ClusterShape:
    """The connected Ray cluster's nodes, and the node types its autoscaler may start
    (``autoscaler.find_autoscaler``: the search file's, then what Ray provides)."""
    import ray

    up = [
        Node({k: float(v) for k, v in node["Resources"].items()}, node.get("NodeManagerHostname", "node"))
        for node in ray.nodes()
        if node.get("Alive")
    ]
    return ClusterShape(up, find_autoscaler(explicit))


# --- This machine and the cluster ---------------------------------------------------------------


def local_shape() -> ClusterShape:
    """This machine as a one-node cluster (what a local Ray instance would have)."""
    import torch

    cpus, gpus = float(os.cpu_count() or 1), float(torch.cuda.device_count())
    return ClusterShape([Node({"CPU": cpus, "GPU": gpus, HEAD_RESOURCE: 1.0}, "local")])


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


def cluster_reachable() -> bool:
    """Whether a Ray cluster is there to join: RAY_ADDRESS, or one running on this node."""
    return bool(os.environ.get("RAY_ADDRESS")) or internals.local_cluster_running()


def check_paths_shared(paths: dict[str, str | None], shared: bool, cluster: ClusterShape) -> None:
    """On more than one node a trial's workers read their inputs and write their checkpoints
    (config key -> value: dataset.root, model.pretrained_weights, storage.path) on any node: a
    local path must lie on a filesystem every node mounts (or ``shared``: the user says so).
    Checked before any trial starts, so a search never fails on its first remote worker.
    ``dataset.cache_dir`` is not among them: each node keeps its own cache there."""
    if not cluster.multi_node or shared:
        return
    local = {k: v for k, v in paths.items() if v and storage.is_local(v) and not on_shared_filesystem(v)}
    if local:
        named = ", ".join(f"{key} = {value!r}" for key, value in local.items())
        raise ConfigError(
            f"{named}: a local path, but this cluster has more than one node ({cluster.describe()}) "
            "and workers on other nodes cannot reach it: use a bucket (gs://BUCKET/...) or a "
            "filesystem every node mounts (then set storage.shared=true)"
        )


def connect_ray(num_cpus: int | None = None) -> bool:
    """Use a running cluster (RAY_ADDRESS, or one on this node such as a `ray up` head);
    otherwise start a local instance. Returns True when this process started Ray."""
    import ray

    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    hook: dict[str, Any] = {"worker_process_setup_hook": "posetune.cluster.worker_logging.quiet_ray_internals"}
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
    # address="local": a new instance, even where a killed cluster left its address behind
    # (/tmp/ray/ray_current_cluster, which ray.init would otherwise try to join).
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, runtime_env=no_preemption, **quiet)
    return True
