"""The private Ray and Optuna names posetune.internals reads still exist in the installed
versions: an upgrade that renames one fails here, naming it, not deep inside a search."""

from __future__ import annotations

import optuna
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from posetune import internals


def test_optuna_search_keeps_its_study_trials_and_told_set_where_posetune_reads_them():
    searcher = OptunaSearch(
        space=lambda trial: trial.suggest_float("x", 0.0, 1.0) and None,
        metric="loss",
        mode="min",
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    assert searcher.suggest("t1") is not None
    for name in (internals.SEARCHER_STUDY, internals.SEARCHER_TRIALS, internals.SEARCHER_TOLD):
        assert hasattr(searcher, name), f"OptunaSearch no longer has {name}: update posetune/internals.py"
    assert isinstance(internals.searcher_study(searcher), optuna.Study)
    assert isinstance(internals.searcher_trial(searcher, "t1"), optuna.Trial)
    assert internals.searcher_told(searcher) == set()
    searcher.on_trial_complete("t1", {"loss": 0.5, "training_iteration": 1})
    assert internals.searcher_told(searcher) == {"t1"}
    saved = searcher.__dict__  # what Tune pickles into searcher-state-*.pkl
    assert internals.study_in_saved_state(saved) is internals.searcher_study(searcher)


def test_ray_private_functions_exist():
    from ray._private import services
    from ray._private.state import state

    assert callable(services.find_gcs_addresses), "ray._private.services.find_gcs_addresses moved"
    assert callable(state.get_cluster_config), "ray._private.state.state.get_cluster_config moved"


def test_the_autoscaling_coordinator_posetune_starts_early_is_the_one_ray_train_asks():
    from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as coordinator
    from ray.train.v2._internal.execution.scaling_policy import autoscaling_coordinator_client as client

    assert client.get_or_create_autoscaling_coordinator is coordinator.get_or_create_autoscaling_coordinator, (
        "Ray Train no longer gets its AutoscalingCoordinator from Ray Data's get_or_create_autoscaling_coordinator: "
        "update posetune/internals.py:start_train_autoscaling_coordinator"
    )


class _Events(tune.Callback):
    """A Tune callback whose pickled copy forgets what it held, as posetune's TrialEvents does."""

    def __init__(self, listeners):
        self.listeners = listeners

    def __getstate__(self):
        return {"listeners": []}


def test_a_restored_tuner_exposes_the_run_config_it_will_run_with(tmp_path):
    def trainable(config):
        return None

    callback = _Events(["live listener"])
    tune.Tuner(trainable, run_config=tune.RunConfig(storage_path=str(tmp_path), name="x", callbacks=[callback]))
    restored = tune.Tuner.restore(str(tmp_path / "x"), trainable)
    run_config = internals.restored_run_config(restored)
    assert isinstance(run_config, tune.RunConfig), "Tuner._local_tuner.get_run_config() moved"
    assert [c.listeners for c in run_config.callbacks] == [[]]  # Tune restores callbacks from its pickle
    run_config.callbacks = [callback]
    assert internals.restored_run_config(restored).callbacks == [callback]


def test_rays_offline_cluster_file_validation_still_exists():
    import jsonschema

    minimal = {
        "cluster_name": "x",
        "provider": {"type": "gcp", "region": "us-central1", "availability_zone": "us-central1-a", "project_id": "p"},
        "available_node_types": {"head": {"resources": {"CPU": 1}, "node_config": {}}},
        "head_node_type": "head",
    }
    prepared = internals.validated_cluster_config(minimal)
    assert prepared["available_node_types"]["head"]["max_workers"] == 0  # filled in by prepare_config
    try:
        internals.validated_cluster_config({**minimal, "max_worker": 1})
    except jsonschema.ValidationError as exc:
        assert "max_worker" in exc.message
    else:
        raise AssertionError("ray.autoscaler._private.util.validate_config no longer rejects unknown keys")
