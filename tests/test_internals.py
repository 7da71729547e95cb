"""The private Ray and Optuna names posetune.internals reads still exist in the installed
versions: an upgrade that renames one fails here, naming it, not deep inside a search."""

from __future__ import annotations

import optuna
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
