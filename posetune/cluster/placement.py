"""Where trials run: how many fit the cluster at once, what each asks Ray for, where its
driver goes.

A trial is one driver (Tune's function plus the Ray Train controller: it only waits) and
``workers_per_trial`` worker bundles of ``{CPU: c, GPU: g}``. Ray places each bundle on one
node, so the plan packs bundles onto *nodes*, never onto cluster totals: three 4-CPU nodes hold
three 3-CPU workers (one each), not the four that 12 CPUs suggest. With an autoscaler the plan
packs onto the largest cluster it may grow to (every node type at its ``max_workers``);
trials beyond what is up now wait for the autoscaler to start nodes instead of failing.

Trial drivers ask for the custom resource ``posetune_driver`` when any node offers it: a
cluster file gives it to the head and to non-preemptible nodes (``cluster/gcp.yaml`` does), so
a preempted spot GPU node costs a worker restart from the trial's checkpoint, never the trial.
Without it, drivers go to the head node (Ray's ``node:__internal_head__`` resource).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from posetune import internals, storage
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
    """The nodes up now and, with an autoscaler, the nodes it may grow to (each node type at its
    maximum count, the ones up now included)."""

    up: list[Node]
    potential: list[Node] | None = None  # None: no autoscaler (the cluster is what is up)

    @property
    def largest(self) -> list[Node]:
        return self.potential if self.potential is not None else self.up

    @property
    def multi_node(self) -> bool:
        return len(self.up) > 1 or len(self.largest) > 1

    def describe(self) -> str:
        def totals(nodes: list[Node]) -> str:
            cpus, gpus = sum(n.cpus for n in nodes), sum(n.gpus for n in nodes)
            return f"{len(nodes)} node(s), {cpus:g} CPUs, {gpus:g} GPUs"

        text = totals(self.up) + " up"
        if self.potential is not None:
            text += f"; autoscaler up to {totals(self.potential)}"
        return text


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
    any_gpu = any(node.gpus > 0 for node in cluster.largest)
    if gpus_per_worker == "auto":
        gpus = 1.0 if any_gpu else 0.0
        if not any_gpu:
            notes.append("no GPU on any node (or node type): trials train on CPU")
    else:
        gpus = float(gpus_per_worker)
    worker = {"CPU": cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    fit_largest = trials_that_fit(cluster.largest, worker, workers_per_trial, num_samples)
    if fit_largest < 1:
        biggest = max(cluster.largest, key=lambda n: (n.gpus, n.cpus), default=Node({}))
        raise ConfigError(
            f"one trial needs {workers_per_trial} worker(s) of {_format(worker)} but no node can hold that "
            f"({cluster.describe()}; the largest node has {_format(biggest.resources)}): lower "
            "resources.workers_per_trial / cpus_per_worker / gpus_per_worker, or add a larger node type"
        )
    fit_now = trials_that_fit(cluster.up, worker, workers_per_trial, num_samples)
    concurrency = fit_largest
    if max_concurrent_trials is not None:
        concurrency = max_concurrent_trials
        if max_concurrent_trials > fit_largest:
            notes.append(f"search.max_concurrent_trials = {max_concurrent_trials}, but only {fit_largest} fit")
    if fit_now < concurrency:
        notes.append(f"{fit_now} trial(s) fit the nodes up now; the rest wait for the autoscaler")
    timeout = START_TIMEOUT_AUTOSCALE_S if cluster.potential is not None else START_TIMEOUT_NOW_S
    return ResourcePlan(gpus, concurrency, fit_now, worker, driver_request(cluster), timeout, cluster.describe(), notes)


def driver_request(cluster: ClusterShape) -> dict[str, float]:
    """What one trial driver asks for: a share of posetune_driver when any node offers it
    (non-preemptible nodes), else of the head node's own resource. No CPU: it only waits."""
    if any(DRIVER_RESOURCE in node.resources for node in cluster.largest):
        return {DRIVER_RESOURCE: DRIVER_SHARE}
    return {HEAD_RESOURCE: DRIVER_SHARE}


def _format(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU") or not k.startswith("node:")}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items()) if not math.isclose(v, 0)) + "}"


# --- Reading the cluster (Ray) ----------------------------------------------------------------


def cluster_shape() -> ClusterShape:
    """The connected Ray cluster's nodes, and its autoscaler's node types when it has one."""
    import ray

    up = [
        Node({k: float(v) for k, v in node["Resources"].items()}, node.get("NodeManagerHostname", "node"))
        for node in ray.nodes()
        if node.get("Alive")
    ]
    return ClusterShape(up, autoscaler_nodes())


def autoscaler_nodes() -> list[Node] | None:
    """Every node the autoscaler may run (each node type at its max count), or None without
    one. Read from the cluster config the autoscaler publishes in Ray's GCS (a private API,
    behind posetune.internals)."""
    config = internals.autoscaler_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    nodes = []
    for group in config.node_group_configs:
        resources = {key: float(value) for key, value in group.resources.items()}
        count = group.max_count if group.max_count >= 0 else 1000  # -1: unlimited
        nodes += [Node(resources, group.name)] * count
    return nodes


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


def check_storage_reachable(folder: str, setting: str, shared: bool, cluster: ClusterShape) -> None:
    """On more than one node every worker writes checkpoints to storage.path (``setting``): a
    head-local folder would scatter them over the workers' disks."""
    if not cluster.multi_node or not storage.is_local(folder) or shared:
        return
    if on_shared_filesystem(folder):
        return
    raise ConfigError(
        f"storage.path = {setting!r} is a local folder, but this cluster has more than one node "
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
    ray.init(num_cpus=num_cpus, include_dashboard=True, runtime_env=no_preemption, **quiet)
    return True
