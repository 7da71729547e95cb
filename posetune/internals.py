"""Every private Ray and Optuna name posetune relies on, in one place.

Each one is pinned by tests/test_internals.py, which fails naming the attribute when a Ray or
Optuna upgrade renames or removes it. Nothing else in posetune reads a private attribute.
"""

from __future__ import annotations

from typing import Any

# OptunaSearch (ray.tune.search.optuna) keeps its study, its Optuna trial per Tune trial and
# the trials it has told Optuna about in these attributes; its saved state is its __dict__.
SEARCHER_STUDY = "_ot_study"
SEARCHER_TRIALS = "_ot_trials"
SEARCHER_TOLD = "_completed_trials"


def searcher_study(searcher: Any):
    """The Optuna study behind a Ray OptunaSearch."""
    return getattr(searcher, SEARCHER_STUDY)


def searcher_trial(searcher: Any, trial_id: str):
    """The Optuna trial (optuna.Trial) a Ray OptunaSearch made for a Tune trial."""
    return getattr(searcher, SEARCHER_TRIALS)[trial_id]


def searcher_told(searcher: Any) -> set[str]:
    """Tune trial ids the searcher has already told Optuna about (mutable)."""
    return getattr(searcher, SEARCHER_TOLD)


def study_in_saved_state(state: dict[str, Any]):
    """The Optuna study in a searcher-state-*.pkl that Tune saved (None when absent)."""
    return state.get(SEARCHER_STUDY)


def restored_run_config(tuner: Any):
    """The RunConfig a restored Tuner will run with (restored from its saved tuner.pkl; Ray
    offers no public way to give a restored search new callbacks)."""
    return tuner._local_tuner.get_run_config()


def local_cluster_running() -> bool:
    """Whether a Ray cluster runs on this node (a `ray up` head, `ray start`)."""
    from ray._private.services import find_gcs_addresses

    return bool(find_gcs_addresses())


def start_train_autoscaling_coordinator() -> None:
    """Start the actor Ray Train's controller sends each trial's resource request to (Ray Data's
    AutoscalingCoordinator: one per cluster, detached) now, beside Tune's set-up, not at the
    first trial: the controller waits up to 5 s for its answer while the actor's process starts
    and imports Ray Data (on 2 cores it timed out with a warning), and the first trial waited."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    get_or_create_autoscaling_coordinator()  # returns at once; the actor starts in the background


def autoscaler_cluster_config():
    """The cluster config the autoscaler publishes in Ray's GCS (node types with their
    resources and max counts), or None without an autoscaler."""
    from ray._private.state import state

    return state.get_cluster_config()


def prepared_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """A cluster-launcher file filled with the provider's defaults, as `ray up` and the
    autoscaler see it (per-type min/max workers included). Offline."""
    import copy
    import logging

    from ray.autoscaler._private.util import prepare_config

    logging.getLogger("ray.autoscaler._private.util").setLevel(logging.WARNING)  # its INFO notes
    return prepare_config(copy.deepcopy(config))


def kuberay_autoscaling_config(cluster_name: str, namespace: str) -> dict[str, Any]:
    """The autoscaling config Ray's KubeRay autoscaler derives from a RayCluster resource: one GET
    on the Kubernetes API with the pod's service-account token, then Ray's own translation."""
    from ray.autoscaler._private.kuberay import node_provider

    ray_cr = node_provider.KubernetesHttpApiClient(namespace=namespace).get(f"rayclusters/{cluster_name}")
    return kuberay_config_from_resource(ray_cr)


def kuberay_config_from_resource(ray_cr: dict[str, Any]) -> dict[str, Any]:
    """Ray's translation of a RayCluster resource into an autoscaling config (offline)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    return _derive_autoscaling_config_from_ray_cr(ray_cr)


def validated_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """A cluster-launcher file as `ray up` sees it: filled with the provider's defaults, then
    checked against Ray's schema (raises jsonschema's ValidationError or ValueError). Offline:
    no cloud is contacted."""
    import copy
    import logging

    from ray.autoscaler._private.util import prepare_config, validate_config

    logging.getLogger("ray.autoscaler._private.util").setLevel(logging.WARNING)  # its INFO notes
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared
