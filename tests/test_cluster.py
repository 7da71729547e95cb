"""Two Ray nodes on this machine (ray.cluster_utils.Cluster, no autoscaler): the plan sees what
is up, and a local storage.path is refused unless shared. The whole search across nodes, with
the experiment and the dataset in a bucket of the GCS emulator, drivers on the head and workers
on other nodes, runs on Ray's own autoscaler in tests/test_autoscaler.py."""

from __future__ import annotations

import pytest

from posetune.cluster.placement import DRIVER_RESOURCE
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
