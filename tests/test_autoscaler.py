"""The search on Ray's own autoscaler, with simulated nodes that carry the node types of the
shipped cluster files (Ray's fake multi-node provider: each "node" is one more raylet on this
machine advertising the type's logical resources; GPUs are logical only).

The cluster starts with its head alone (every worker type at min_workers 0, as shipped), as a
`ray up` head: the resolved cluster file lies at ~/ray_bootstrap_config.yaml (HOME is a temporary
folder here), which is where posetune reads the node types from."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import REPO, free_port, ray_processes, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.autoscaler, pytest.mark.timeout(900)]

FAKE_PROVIDER = {
    "type": "external",
    "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
    "use_node_id_as_ip": True,
    "disable_node_updaters": True,
    "disable_launch_config_check": True,
}
# The launcher keys the fake provider's config must carry, empty (Ray 2.60's wheel lacks the
# provider's default file that would fill them).
EMPTY_LAUNCHER_KEYS = {
    "auth": {},
    "docker": {},
    "file_mounts": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "cluster_synced_files": [],
    "rsync_exclude": [],
    "rsync_filter": [],
    "file_mounts_sync_continuously": False,
}
FAKE_HEAD = "ray.head.default"  # the fake provider's head node type name
HEAD_ONLY = "node:__internal_head__"  # the resource Ray gives the head node alone
OBJECT_STORE = 100 * 2**20
# On a cluster every path a trial reaches must be shared: the shipped spaces in a bucket.
BUCKET_PATHS = ["storage.path=gs://b/searches", "dataset.root=gs://b/data"]


def fake_cluster_config(cluster_file: Path, head_cpus: float, worker_types: dict | None = None) -> dict:
    """A fake-provider config with the shipped file's worker node types (resources, min and max
    counts, the cluster-wide max_workers), or `worker_types` instead, and its head's custom
    resources on a head of `head_cpus` CPUs."""
    shipped = yaml.safe_load(cluster_file.read_text())
    head = shipped["available_node_types"][shipped["head_node_type"]]
    types = {
        FAKE_HEAD: {"resources": {**head.get("resources", {}), "CPU": head_cpus}, "node_config": {}, "max_workers": 0}
    }
    for name, spec in (worker_types or shipped["available_node_types"]).items():
        if name == shipped["head_node_type"]:
            continue
        types[name] = {
            "resources": {**spec["resources"], "object_store_memory": OBJECT_STORE},
            "node_config": {},
            "min_workers": spec.get("min_workers", 0),
            "max_workers": spec["max_workers"],
        }
    return {
        "cluster_name": "fake",
        "max_workers": shipped.get("max_workers", sum(t["max_workers"] for t in types.values())),
        "provider": FAKE_PROVIDER,
        "available_node_types": types,
        "head_node_type": FAKE_HEAD,
        "idle_timeout_minutes": 0.1,
        "upscaling_speed": 1000,
        **EMPTY_LAUNCHER_KEYS,
    }


class FakeCluster:
    """`ray start --head` with the real autoscaler (v1 monitor) over the fake provider."""

    def __init__(self, home: Path, config: dict, v2: bool = False):
        self.home, self.config = home, config
        self.env = {**os.environ, "HOME": str(home), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        if v2:  # autoscaler v2 on the fake provider, as Ray's own tests run it
            from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

            config["provider"] = {**config["provider"], "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID}
            self.env |= {
                "RAY_enable_autoscaler_v2": "1",
                "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
            }

    def start(self) -> None:
        import ray.autoscaler.v2.utils as autoscaler_v2_utils
        from ray._private.services import find_gcs_addresses
        from ray._private.services import get_node_ip_address as node_ip_address

        # A Ray instance of an earlier test may still be exiting, and Ray caches the addresses it
        # found: wait for none, forget them, and give the head a port of its own.
        wait_for(lambda: not ray_processes(), 60, "an earlier test's Ray processes to exit")
        find_gcs_addresses.cache_clear()
        # Ray also caches, per process, whether the cluster runs autoscaler v2: an earlier
        # test's instance would send this one's resource requests the v1 way, which v2 ignores.
        autoscaler_v2_utils.cached_is_autoscaler_v2 = None
        port = free_port()
        # The fake provider's nodes join the GCS at gcs_address (default: port 6379).
        self.config["provider"] = {**self.config["provider"], "gcs_address": f"{node_ip_address()}:{port}"}
        config_file = self.home / "ray_bootstrap_config.yaml"  # as `ray up` leaves it on the head
        config_file.write_text(yaml.safe_dump(self.config))
        head = self.config["available_node_types"][FAKE_HEAD]["resources"]
        custom = {k: v for k, v in head.items() if k not in ("CPU", "GPU")}
        command = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
            f"--autoscaling-config={config_file}", f"--num-cpus={head['CPU']:g}", "--num-gpus=0",
            f"--port={port}",
            "--resources", json.dumps(custom), f"--object-store-memory={OBJECT_STORE}",
        ]  # fmt: skip
        started = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]

    def stop(self) -> None:
        from ray._private.services import find_gcs_addresses

        subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], env=self.env, capture_output=True
        )
        wait_for(lambda: not ray_processes(), 60, "the simulated cluster's Ray processes to exit")
        find_gcs_addresses.cache_clear()

    def worker_types_up(self) -> list[str]:
        """The node types of the worker nodes alive now, told apart by their CPUs and GPUs (the
        fake provider tags its nodes with their types, but Ray's node table does not show it)."""
        import ray

        def type_of(resources: dict) -> str:
            shape = (resources.get("CPU", 0), resources.get("GPU", 0))
            for name, spec in self.config["available_node_types"].items():
                if (spec["resources"].get("CPU", 0), spec["resources"].get("GPU", 0)) == shape:
                    return name
            return f"unknown {shape}"

        return sorted(type_of(n["Resources"]) for n in ray.nodes() if n["Alive"] and not n["Resources"].get(HEAD_ONLY))


@pytest.fixture
def fake_home(tmp_path, monkeypatch):
    """HOME for the simulated head. Ray's token (~/.ray/auth_token) comes along: a Ray instance
    an earlier test started in this process may have switched it to token authentication
    (RAY_AUTH_MODE=token), and the simulated cluster and this process must share the token."""
    import shutil

    home = tmp_path / "home"
    token = Path.home() / ".ray" / "auth_token"
    (home / ".ray").mkdir(parents=True)
    if token.is_file():
        shutil.copy(token, home / ".ray" / "auth_token")
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.mark.parametrize("v2", [False, True], ids=["autoscaler-v1", "autoscaler-v2"])
def test_a_head_only_cluster_plans_for_the_gpu_types_it_can_start(fake_home, tmp_path, v2):
    """gcp.yaml's node types, none up: the plan asks for GPUs, counts trials on the startable
    nodes within the cluster-wide cap, and names its source."""
    import ray

    from posetune.cluster.placement import cluster_shape
    from posetune.search.run import plan_resources
    from posetune.search.space import load_space

    cluster = FakeCluster(fake_home, fake_cluster_config(REPO / "cluster" / "gcp.yaml", head_cpus=2), v2=v2)
    cluster.start()
    try:
        ray.init(address="auto", logging_level="WARNING")
        shape = cluster_shape()
        assert len(shape.up) == 1 and shape.autoscaler is not None
        assert shape.autoscaler.source.endswith("ray_bootstrap_config.yaml")
        shipped = yaml.safe_load((REPO / "cluster" / "gcp.yaml").read_text())
        expected = {n for n in shipped["available_node_types"] if n != shipped["head_node_type"]}
        assert {t.name for t in shape.autoscaler.node_types} == expected
        assert shape.autoscaler.max_workers == shipped["max_workers"]
        space, _ = load_space(REPO / "search_spaces" / "default.yaml", BUCKET_PATHS)
        plan = plan_resources(space, shape)
        assert plan.gpus_per_worker == 1.0 and plan.worker.get("GPU") == 1.0
        assert plan.fit_now == 0 and 0 < plan.concurrency <= shipped["max_workers"]
        # --dry-run on the head prints that plan.
        dry = subprocess.run(
            [sys.executable, "-m", "posetune", "search", "search_spaces/default.yaml", "--dry-run",
             *BUCKET_PATHS],
            cwd=REPO, capture_output=True, text=True, env={**os.environ, "HOME": str(fake_home)}, timeout=120,
        )  # fmt: skip
        assert dry.returncode == 0, dry.stderr[-2000:]
        assert f"trials at once: 0 on the nodes up now, {plan.concurrency} once scaled" in dry.stdout
        assert "x 1 GPU" in dry.stdout and "ray_bootstrap_config.yaml" in dry.stdout
        assert "trial drivers: on nodes with the posetune_driver resource" in dry.stdout
        # What the plan asks for, the autoscaler starts: a worker's bundle brings up a GPU type.
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[plan.worker])
        gpu_types = {t.name for t in shape.autoscaler.node_types if t.resources.get("GPU")}
        wait_for(lambda: set(cluster.worker_types_up()) & gpu_types, 300, "a GPU node type to start")
        request_resources(bundles=[])
    finally:
        ray.shutdown()
        cluster.stop()


CPU_WORKERS = {"cpu_worker": {"resources": {"CPU": 1}, "min_workers": 0, "max_workers": 2}}


def bucket_space(tmp_path: Path, data: Path, bucket: str, name: str, trials: int = 2, budget: int = 192) -> Path:
    """A search of `trials` trials of `budget` samples (an evaluation and a checkpoint every 96)
    with its data and experiment in the emulator's bucket."""
    from posetune.data.tools import push_dataset

    from helpers import tiny_space

    push_dataset(str(data), f"gs://{bucket}/data")
    return tiny_space(
        tmp_path,
        data,
        name=name,
        search__num_samples=trials,
        search__max_concurrent_trials=None,
        search__points_to_evaluate=[],
        search__asha={"max_samples": budget, "grace_samples": budget, "reduction_factor": 2},
        storage__path=f"gs://{bucket}/searches",
        base__overrides={
            "dataset.root": f"gs://{bucket}/data",
            "dataset.image_scale": "64x40",
            "dataset.num_workers": 0,
            "train.batch_size": 16,
            "val.eval_every_samples": 96,
        },
        resources__cpus_per_worker=1.0,
        resources__local_cpus=None,
    )


@pytest.fixture
def cpu_cluster(fake_home, gcs):
    """Head only (0 CPUs, the trial drivers' resource), a CPU worker type at 0..2, connected."""
    import ray

    config = fake_cluster_config(REPO / "cluster" / "gcp.yaml", head_cpus=0, worker_types=CPU_WORKERS)
    cluster = FakeCluster(fake_home, config)
    cluster.env["STORAGE_EMULATOR_HOST"] = gcs.host  # the simulated nodes' raylets reach the bucket
    cluster.start()
    try:
        ray.init(address="auto", logging_level="WARNING")
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()


def log_clock(log: str, event: str) -> int:
    """Seconds into the search of a progress line ("[  1:16] trial 3c5d07b8 completed ...")."""
    (clock,) = [line[1 : line.index("]")] for line in log.splitlines() if line.startswith("[") and event in line]
    minutes, seconds = clock.strip().split(":")
    return 60 * int(minutes) + int(seconds)


def start_search(space: Path, cwd: Path, env: dict) -> subprocess.Popen:
    """`posetune search SPACE` on the head, its output in cwd/search.txt."""
    with open(cwd / "search.txt", "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "posetune", "search", str(space)], cwd=cwd, stdout=out, stderr=out, env=env
        )


def test_a_search_scales_workers_up_from_zero_and_back(cpu_cluster, fake_home, gcs, bucket, synth_small, tmp_path):
    """The search's worker groups make the autoscaler start nodes of the CPU type; the drivers
    stay on the head; the experiment lands in the bucket; with the head's MLflow store lost,
    --resume completes against a fresh store; the cluster goes back to the head alone."""
    import ray
    from mlflow import MlflowClient
    from ray.util.state import list_actors

    from posetune import storage

    head = ray.get_runtime_context().get_node_id()
    assert cpu_cluster.worker_types_up() == []
    space = bucket_space(tmp_path, synth_small, bucket, "zero")
    head_store = tmp_path / "head-mlflow.db"  # the head's own MLflow store, lost below
    env = {**os.environ, "HOME": str(fake_home), "MLFLOW_TRACKING_URI": f"sqlite:///{head_store}"}
    seen: set[str] = set()
    driver = start_search(space, tmp_path, env)
    while driver.poll() is None:
        seen |= set(cpu_cluster.worker_types_up())
        time.sleep(1)
    log = (tmp_path / "search.txt").read_text()
    assert driver.returncode == 0, log[-3000:]
    assert seen == {"cpu_worker"}, seen
    # The trials ended on their own at the budget (search.searchers.BudgetASHA), so each Ray
    # Train controller withdrew its request to the autoscaler as it shut down. (Under Ray's ASHA
    # a trial whose stop came before its own return left its request for Train's 180 s expiry:
    # a race, seen once in two trials here, not every run.)
    assert train_autoscaling_requests() == {}, train_autoscaling_requests()
    assert "autoscaler: cpu_worker x0-2 {CPU: 1, object_store_memory: 0.0977 GiB}" in log
    assert "ray_bootstrap_config.yaml" in log

    folder = f"gs://{bucket}/searches/zero"
    results = json.loads(storage.read_text(f"{folder}/results.json"))["trials"]
    assert [r["status"] for r in results] == ["completed", "completed"]
    for record in results:  # resource-hours count from the workers' start, not the node's boot
        started, ended = (log_clock(log, f"trial {record['id']} {what}") for what in ("started", "completed"))
        assert record["resource_hours"]["CPU"] * 3600 < ended - started - 15, (record, started, ended)
    names = gcs.names(bucket, "searches/zero/")
    for expected in ("search.json", "best_config.yaml", "best/model.pt", "summary.txt", "tracking.json"):
        assert f"searches/zero/{expected}" in names, expected
    assert any(n.startswith("searches/zero/tune/") for n in names)  # Tune's experiment state
    for record in results:  # each trial's checkpoints, written by a worker on another node
        assert record["checkpoint"].startswith(f"{folder}/train/{record['id']}/checkpoint_")
        assert storage.exists(f"{record['checkpoint']}/best.pt")
    actors = list_actors(detail=True, limit=10000)
    drivers = [a for a in actors if a.class_name.endswith("ImplicitFunc")]
    workers = [a for a in actors if a.class_name == "RayTrainWorker"]
    assert len(drivers) == 2 and {a.node_id for a in drivers} == {head}
    assert len(workers) == 2 and head not in {a.node_id for a in workers}
    client = MlflowClient(env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("zero").experiment_id])
    assert len([r for r in runs if r.data.tags.get("posetune.trial_id")]) == 2
    assert [str(v.version) for v in client.search_model_versions("name='posetune-zero'")] == ["1"]  # best model

    # The head is lost with its MLflow store; everything else is in the bucket. --resume from
    # a new working directory completes the search against a fresh store.
    head_store.unlink()
    (tmp_path / "new-head").mkdir()
    resumed = subprocess.run(
        [sys.executable, "-m", "posetune", "search", str(space), "--resume"],
        cwd=tmp_path / "new-head", capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "re-created from the experiment folder" in resumed.stdout, resumed.stdout
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("zero").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("posetune.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["posetune.trial_id"] for r in children) == sorted(r["id"] for r in results)
    for child in children:
        assert child.data.tags["posetune.status"] == "completed" and "pose_error" in child.data.metrics
        assert [a.path for a in client.list_artifacts(child.info.run_id, "checkpoints")] == ["checkpoints/best.pt"]

    # The trials ended on their own at the budget (search.searchers.BudgetASHA), so Ray Train
    # withdrew their autoscaler requests; then the idle timeout applies. (A trial that Tune
    # stops keeps its request for 180 s: Train's AUTOSCALING_REQUESTS_EXPIRE_TIME_S.)
    wait_for(lambda: cpu_cluster.worker_types_up() == [], 300, "the autoscaler to remove the idle workers")


def train_autoscaling_requests() -> dict:
    """Ray Train's standing requests to the autoscaler (requester id -> bundles), read from the
    AutoscalingCoordinator actor Train 2.60 sends them through (its private _ongoing_reqs; a
    test-only probe), or {} when there is no coordinator."""
    import ray

    try:
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    except ValueError:
        return {}
    requests = coordinator.__ray_call__.remote(lambda actor: dict(actor._ongoing_reqs))
    return {key: value.requested_resources for key, value in ray.get(requests, timeout=30).items()}


def kill_node(node_id: str) -> None:
    """A simulated node's sudden death, as a reclaimed VM's: its raylet and every process it
    started (the workers; killing the raylet alone leaves them training)."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        if f"--node_id={node_id}" in (process.info["cmdline"] or []):
            for member in [*process.children(recursive=True), process]:
                with contextlib.suppress(psutil.NoSuchProcess):  # one may exit on its own meanwhile
                    member.kill()
            return
    raise AssertionError(f"no raylet for node {node_id}")


def test_preempted_workers_cost_no_finished_work_however_often(cpu_cluster, fake_home, bucket, synth_small, tmp_path):
    """A spot worker is drained as preempted (what cluster/gcp.yaml's shutdown script does on a
    GCE preemption notice), then dies: Ray Train counts it as a preemption, not against
    max_failures, and the trial continues from its latest checkpoint on a new node, more times
    than max_failures allows."""
    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.util.state import list_actors

    from posetune import storage
    from posetune.search.trial import WORKER_RESTARTS

    space = bucket_space(tmp_path, synth_small, bucket, "spot", trials=1, budget=1152)
    results = f"gs://{bucket}/searches/spot/results.json"

    def samples() -> int:
        if not storage.exists(results):
            return 0
        return max((r["samples_seen"] for r in json.loads(storage.read_text(results))["trials"]), default=0)

    def fresh_worker(killed: set[str]):
        """The trial's one live worker on a node not killed yet, or None. The GCS still lists a
        killed node alive (and its actor) until health checks miss it, which takes longer under
        load, and results.json can still bring the killed worker's last report: a drain sent
        to that node waits on a raylet that is gone, and fails "GRPC client is shut down"."""
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        fresh = [w for w in workers if w.node_id not in killed]
        return fresh[0] if len(fresh) == 1 else None

    driver = start_search(space, tmp_path, {**os.environ, "HOME": str(fake_home)})
    reached, killed = [], set()
    try:
        for _ in range(WORKER_RESTARTS + 1):
            wait_for(lambda: fresh_worker(killed) is not None, 300, "the trial's worker on a node not killed yet")
            before = samples()
            wait_for(lambda before=before: samples() > before, 300, "a new checkpointed result")
            reached.append(samples())
            worker = fresh_worker(killed)
            assert worker is not None, "the trial's worker went away without a kill"
            # The GCS call `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` makes, with a
            # client of its own as the CLI's.
            gcs = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)
            accepted, why = gcs.drain_node(
                worker.node_id,
                autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                "spot preemption (test)",
                int(time.time() * 1000) + 5000,
            )
            assert accepted, why
            time.sleep(2)
            kill_node(worker.node_id)
            killed.add(worker.node_id)
        driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    log = (tmp_path / "search.txt").read_text()
    assert driver.returncode == 0, log[-3000:]
    (record,) = json.loads(storage.read_text(results))["trials"]
    assert record["status"] == "completed" and record["samples_seen"] == 1152, record
    assert reached == sorted(reached) and reached[-1] < 1152  # each kill came after more finished work
