"""Resource plans worked out by hand for several cluster shapes."""

from __future__ import annotations

import pytest

from posetune.cluster.autoscaler import Autoscaler, NodeType
from posetune.cluster.placement import (
    DRIVER_RESOURCE,
    HEAD_RESOURCE,
    START_TIMEOUT_AUTOSCALE_S,
    START_TIMEOUT_NOW_S,
    ClusterShape,
    Node,
    plan_resources,
    trials_that_fit,
)
from posetune.errors import ConfigError


def nodes(count: int, **resources) -> list[Node]:
    return [Node({k: float(v) for k, v in resources.items()})] * count


def plan(cluster, workers=1, cpus=1.0, gpus="auto", samples=100, concurrent=None):
    return plan_resources(
        workers_per_trial=workers,
        cpus_per_worker=cpus,
        gpus_per_worker=gpus,
        num_samples=samples,
        max_concurrent_trials=concurrent,
        cluster=cluster,
    )


def test_bundles_pack_onto_nodes_not_onto_totals():
    # Two 4-CPU nodes: 8 CPUs in total, but a 3-CPU worker leaves 1 CPU on each node.
    assert trials_that_fit(nodes(2, CPU=4), {"CPU": 3}, workers=1, limit=10) == 2
    assert trials_that_fit(nodes(1, CPU=8), {"CPU": 3}, workers=1, limit=10) == 2
    # Two-worker trials of 3 CPUs on three 4-CPU nodes: totals say 2, nodes hold 1.
    assert trials_that_fit(nodes(3, CPU=4), {"CPU": 3}, workers=2, limit=10) == 1
    # Four 1-GPU nodes hold four 1-GPU workers; a 2-GPU worker fits none of them.
    assert trials_that_fit(nodes(4, CPU=8, GPU=1), {"CPU": 4, "GPU": 1}, workers=1, limit=10) == 4
    assert trials_that_fit(nodes(4, CPU=8, GPU=1), {"CPU": 4, "GPU": 2}, workers=1, limit=10) == 0
    # Mixed shapes: an 8-GPU node holds two 4-worker trials, two 1-GPU nodes one 2-worker one.
    mixed = nodes(1, CPU=64, GPU=8) + nodes(2, CPU=8, GPU=1)
    assert trials_that_fit(mixed, {"CPU": 4, "GPU": 1}, workers=4, limit=10) == 2
    assert trials_that_fit(mixed, {"CPU": 4, "GPU": 1}, workers=2, limit=10) == 5
    assert trials_that_fit(mixed, {"CPU": 4, "GPU": 1}, workers=2, limit=3) == 3  # num_samples caps it


def test_cpu_cluster_plan():
    p = plan(ClusterShape(nodes(1, CPU=2, **{HEAD_RESOURCE: 1})), cpus=0.95, samples=8)
    assert (p.concurrency, p.fit_now, p.gpus_per_worker) == (2, 2, 0.0)
    assert p.worker == {"CPU": 0.95} and p.driver == {HEAD_RESOURCE: 0.001}
    assert p.start_timeout_s == START_TIMEOUT_NOW_S
    assert "no GPU on any node (or node type): trials train on CPU" in p.notes


def test_autoscaler_from_zero_gpus_plans_for_its_maximum_and_asks_for_gpus():
    # Head (CPU only, hosts drivers) is up; the autoscaler may start up to 4 L4 nodes (1 GPU)
    # and 2 A100 nodes (8 GPUs each), none of them up yet.
    head = nodes(1, CPU=8, **{DRIVER_RESOURCE: 1000, HEAD_RESOURCE: 1})
    types = (NodeType("l4", {"CPU": 8, "GPU": 1}, 0, 4), NodeType("a100", {"CPU": 96, "GPU": 8}, 0, 2))
    p = plan(ClusterShape(head, Autoscaler(types, 6, "test")), cpus=6, samples=48)
    assert p.gpus_per_worker == 1.0 and p.worker == {"CPU": 6, "GPU": 1.0}  # auto asks for GPUs
    # 4 on L4 nodes (one each) + 16 on the A100 nodes (96 CPUs / 6 = 16 >= 8 GPUs: 8 each).
    assert p.concurrency == 4 + 16 and p.fit_now == 0
    assert p.start_timeout_s == START_TIMEOUT_AUTOSCALE_S  # wait for the autoscaler, do not fail
    assert p.driver == {DRIVER_RESOURCE: 0.001}  # on the head / non-preemptible nodes
    assert any("wait for the autoscaler" in note for note in p.notes)


def test_the_cluster_wide_cap_bounds_the_nodes_the_plan_counts_on():
    head = nodes(1, CPU=2, **{HEAD_RESOURCE: 1})
    types = (NodeType("l4", {"CPU": 8, "GPU": 1}, 0, 4), NodeType("a100", {"CPU": 96, "GPU": 8}, 0, 2))
    # Room for 3 worker nodes: the A100 type holds 8 trials a node, so two of those, then one L4.
    p = plan(ClusterShape(head, Autoscaler(types, 3, "test")), cpus=6, samples=48)
    assert p.concurrency == 8 + 8 + 1 and p.fit_now == 0
    # One L4 node already up counts against the cap and its type's maximum.
    up = [*head, Node({"CPU": 8, "GPU": 1}, "l4")]
    assert plan(ClusterShape(up, Autoscaler(types[:1], 2, "test")), cpus=6, samples=48).concurrency == 2
    # An explicit concurrency above what can ever fit is capped, with a note saying so.
    capped = plan(ClusterShape(head, Autoscaler(types[:1], 2, "test")), cpus=6, samples=48, concurrent=10)
    assert capped.concurrency == 2 and "capped at 2" in capped.notes[0]


def test_a_cpu_only_cluster_with_startable_gpu_types_asks_for_gpus():
    head = nodes(1, CPU=2, **{HEAD_RESOURCE: 1})
    p = plan(ClusterShape(head, Autoscaler((NodeType("l4", {"CPU": 8, "GPU": 1}, 0, 2),), 2, "test")), cpus=6)
    assert p.worker == {"CPU": 6, "GPU": 1.0} and p.concurrency == 2 and p.fit_now == 0


def test_explicit_concurrency_and_gpu_count():
    cluster = ClusterShape(nodes(2, CPU=8, GPU=2))
    p = plan(cluster, gpus=2, cpus=4, concurrent=5)
    assert p.concurrency == 2 and p.fit_now == 2 and p.worker == {"CPU": 4, "GPU": 2.0}
    assert "search.max_concurrent_trials = 5, but only 2 fit the nodes up: capped at 2" in p.notes[0]
    assert plan(cluster, gpus=0, cpus=4).gpus_per_worker == 0.0  # an explicit 0 means CPU


def test_a_trial_that_can_never_be_placed_is_an_error_naming_the_resources():
    cluster = ClusterShape(nodes(1, CPU=8), Autoscaler((NodeType("g", {"CPU": 16, "GPU": 1}, 0, 3),), 3, "test"))
    with pytest.raises(ConfigError, match=r"2 worker\(s\) of \{CPU: 4, GPU: 2\} but no node can hold that"):
        plan(cluster, workers=2, cpus=4, gpus=2)
    with pytest.raises(ConfigError, match=r"the largest node has \{CPU: 16, GPU: 1\}"):
        plan(cluster, cpus=32)


def test_multi_node_is_judged_on_what_the_cluster_may_become():
    assert not ClusterShape(nodes(1, CPU=2)).multi_node
    assert ClusterShape(nodes(2, CPU=2)).multi_node
    assert ClusterShape(nodes(1, CPU=2), Autoscaler((NodeType("g", {"CPU": 8, "GPU": 1}, 0, 1),), 1, "test")).multi_node


def test_node_types_in_the_search_file_override_the_cluster(tmp_path):
    import yaml

    from posetune.cluster.autoscaler import find_autoscaler
    from posetune.search.space import load_space

    from helpers import REPO

    space = yaml.safe_load((REPO / "search_spaces" / "quick.yaml").read_text())
    space["base"]["config"] = str(REPO / "configs" / "quick.yaml")
    space["resources"] = {
        "node_types": {"gpu_l4": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 4}},
        "max_workers": 3,
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(space))
    explicit = load_space(path)[0].resources.autoscaler()
    assert explicit == Autoscaler((NodeType("gpu_l4", {"CPU": 8.0, "GPU": 1.0}, 0, 4),), 3, explicit.source)
    assert find_autoscaler(explicit) is explicit and "resources.node_types" in explicit.source
    head = nodes(1, CPU=2, **{HEAD_RESOURCE: 1})
    assert plan(ClusterShape(head, explicit), cpus=6).concurrency == 3  # the cap, not the type's 4


def test_the_bootstrap_file_ray_up_leaves_on_the_head_is_read_through_rays_prepare_config(tmp_path):
    """cluster/gcp.yaml as `ray up` would leave it: its worker types and cap, head excluded."""
    import shutil

    import yaml

    from posetune.cluster.autoscaler import from_bootstrap_file

    from helpers import REPO

    shutil.copy(REPO / "cluster" / "gcp.yaml", tmp_path / "ray_bootstrap_config.yaml")
    found = from_bootstrap_file(str(tmp_path / "ray_bootstrap_config.yaml"))
    shipped = yaml.safe_load((REPO / "cluster" / "gcp.yaml").read_text())
    workers = {n: t for n, t in shipped["available_node_types"].items() if n != shipped["head_node_type"]}
    assert {t.name: t.max_workers for t in found.node_types} == {n: t["max_workers"] for n, t in workers.items()}
    assert found.max_workers == shipped["max_workers"]
    assert from_bootstrap_file(str(tmp_path / "missing.yaml")) is None
    (tmp_path / "broken.yaml").write_text("available_node_types: [")
    with pytest.raises(ConfigError, match=r"broken.yaml \(the cluster file `ray up` left on the head\) cannot be read"):
        from_bootstrap_file(str(tmp_path / "broken.yaml"))


def test_local_inputs_are_refused_on_more_than_one_node_unless_shared(tmp_path):
    from posetune.cluster.placement import check_paths_shared

    weights = str(tmp_path / "vgg16.pth")
    inputs = {"dataset.root": "gs://b/data", "model.pretrained_weights": weights}
    one = ClusterShape(nodes(1, CPU=2))
    two = ClusterShape(nodes(2, CPU=2))
    check_paths_shared(inputs, False, one)  # one node: any path works
    check_paths_shared(inputs, True, two)  # the user says every node mounts it
    check_paths_shared({"dataset.root": "gs://b/data", "model.pretrained_weights": None}, False, two)
    with pytest.raises(ConfigError, match=r"model.pretrained_weights = '.*vgg16.pth': a local path, but this cluster"):
        check_paths_shared(inputs, False, two)
    scaled = ClusterShape(nodes(1, CPU=2), Autoscaler((NodeType("g", {"CPU": 8, "GPU": 1}, 0, 2),), 2, "test"))
    with pytest.raises(ConfigError, match=r"dataset.root = .*then set storage.shared=true"):
        check_paths_shared({"dataset.root": str(tmp_path)}, False, scaled)


def test_the_head_is_not_a_worker_of_its_shape_and_a_cap_of_zero_starts_nothing():
    head = nodes(1, CPU=8, **{HEAD_RESOURCE: 1})
    cpu8 = (NodeType("cpu8", {"CPU": 8}, 0, 2),)
    assert plan(ClusterShape(head, Autoscaler(cpu8, 2, "test")), cpus=8, gpus=0).concurrency == 3
    gpu = (NodeType("l4", {"CPU": 8, "GPU": 1}, 0, 2),)
    p = plan(ClusterShape(head, Autoscaler(gpu, 0, "test")), cpus=4)  # no worker may start: CPU on the head
    assert p.gpus_per_worker == 0.0 and p.concurrency == 2
