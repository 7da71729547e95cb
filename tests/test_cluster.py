"""A search across two Ray nodes on this machine (ray.cluster_utils.Cluster): trial drivers on
the head (which has no CPU for workers), Ray Train workers on the second node, the experiment
and the dataset in a bucket of the GCS emulator."""

from __future__ import annotations

import json

import pytest

from posetune import cli, storage
from posetune.cluster.placement import DRIVER_RESOURCE
from posetune.data.tools import push_dataset
from posetune.errors import ConfigError
from posetune.search.run import run_search
from posetune.search.space import load_space

from helpers import tiny_space

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def two_nodes(gcs):  # the emulator first: Ray's processes inherit its address
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "resources": {DRIVER_RESOURCE: 1000}, "include_dashboard": True},
    )
    worker = cluster.add_node(num_cpus=2)
    ray.init(
        address=cluster.address,
        logging_level="WARNING",
        runtime_env={
            "env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "STORAGE_EMULATOR_HOST": gcs.host},
        },
    )
    yield cluster.head_node.node_id, worker.node_id
    ray.shutdown()
    cluster.shutdown()


def test_a_cluster_without_an_autoscaler_is_what_is_up(two_nodes):
    """Ray's GCS cluster config answers (None: no Ray up to 2.60 writes it) and no other source
    of node types exists here: the shape is the two nodes up."""
    from posetune.cluster.autoscaler import from_gcs
    from posetune.cluster.placement import cluster_shape

    assert from_gcs() is None
    shape = cluster_shape()
    assert len(shape.up) == 2 and shape.autoscaler is None and shape.multi_node


def test_local_storage_is_refused_on_two_nodes(two_nodes, synth_small, tmp_path):
    space, base = load_space(tiny_space(tmp_path, synth_small, name="local"))
    with pytest.raises(ConfigError, match=r"storage.path = .*: a local path, but this cluster has more than one"):
        run_search(space, base)
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_local_storage_on_two_nodes_is_accepted_when_marked_shared(two_nodes, tmp_path):
    """storage.shared: true says every node mounts the folder (the README's exception)."""
    from posetune.cluster.placement import check_paths_shared, cluster_shape

    paths = {"storage.path": str(tmp_path / "runs")}
    check_paths_shared(paths, True, cluster_shape())
    with pytest.raises(ConfigError, match=r"then set storage\.shared=true"):
        check_paths_shared(paths, False, cluster_shape())


def test_search_in_a_bucket_across_two_nodes(two_nodes, gcs, bucket, synth_small, tmp_path, capsys):
    from mlflow import MlflowClient
    from ray.util.state import list_actors

    head, worker = two_nodes
    push_dataset(str(synth_small), f"gs://{bucket}/data")
    space = tiny_space(
        tmp_path,
        synth_small,
        name="two",
        search__num_samples=2,
        search__points_to_evaluate=[],
        search__asha={"max_samples": 192, "grace_samples": 192, "reduction_factor": 2},
        storage__path=f"gs://{bucket}/searches",
        base__overrides={
            "dataset.root": f"gs://{bucket}/data",
            "dataset.image_scale": "64x40",
            "dataset.cache_dir": str(tmp_path / "cache"),
            "dataset.num_workers": 0,
            "train.batch_size": 16,
            "val.eval_freq": 1,
        },
    )
    assert cli.main(["search", str(space)]) == 0
    out = capsys.readouterr().out
    assert "2 trials in" in out and "best checkpoint: gs://" in out

    folder = f"gs://{bucket}/searches/two"
    results = json.loads(storage.read_text(f"{folder}/results.json"))["trials"]
    assert [r["status"] for r in results] == ["completed", "completed"]
    names = gcs.names(bucket, "searches/two/")
    for expected in ("search.json", "best_config.yaml", "best/model.pt", "summary.txt", "tracking.json"):
        assert f"searches/two/{expected}" in names, expected
    assert any(n.startswith("searches/two/tune/") for n in names)  # Tune's experiment state
    for record in results:  # each trial's checkpoints, written by a worker on the other node
        assert record["checkpoint"].startswith(f"{folder}/train/{record['id']}/checkpoint_")
        assert storage.exists(f"{record['checkpoint']}/best.pt")

    # Where things ran: every trial driver on the head, every Train worker on the second node.
    actors = list_actors(detail=True, limit=10000)
    # Tune's function actor: reported as ImplicitFunc or wrap_function.<locals>.ImplicitFunc
    drivers = [a for a in actors if a.class_name.endswith("ImplicitFunc")]
    workers = [a for a in actors if a.class_name == "RayTrainWorker"]
    assert len(drivers) == 2 and {a.node_id for a in drivers} == {head}
    assert len(workers) == 2 and {a.node_id for a in workers} == {worker}

    # MLflow: the checkpoints reached the driver's store from the bucket.
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("two").experiment_id])
    children = [r for r in runs if r.data.tags.get("posetune.trial_id")]
    assert len(children) == 2
    for run in children:
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.pt"]
    assert [str(v.version) for v in client.search_model_versions("name='posetune-two'")] == ["1"]  # best model
