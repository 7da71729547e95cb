"""The searcher a search uses (posetune.searchers), driven here without Ray: every registered
sampler proposes valid trials, and TPE models the results for most of a small search."""

from __future__ import annotations

import math
from unittest import mock

import optuna
import pytest

from posetune.search.searchers import build_searcher, list_samplers
from posetune.search.space import load_space

REAL_RANDOM_DRAW = optuna.samplers.RandomSampler.sample_independent  # counted, still drawn


def run_searcher(space, trials: int) -> list[dict]:
    """Propose, then finish, `trials` trials one by one, scoring them by distance to a known
    best learning rate (ASHA's full budget: each is told as COMPLETE)."""
    searcher = build_searcher(space)
    proposed = []
    for i in range(trials):
        config = searcher.suggest(f"t{i}")
        proposed.append(config)
        score = (math.log10(config["optimizer.lr"]) + 2.9) ** 2
        result = {"pose_error": score, "samples_seen": space.search.asha.max_samples, "training_iteration": 1}
        searcher.on_trial_complete(f"t{i}", result)
    return proposed


@pytest.mark.parametrize("name", list_samplers())
def test_every_sampler_proposes_trials_within_the_space(name):
    space, _ = load_space("search_spaces/quick.yaml", [f"search.searcher={name}"])
    for config in run_searcher(space, 6):
        assert 5e-4 <= config["optimizer.lr"] <= 4e-3 and config["train.batch_size"] in (16, 32)
        assert ("optimizer.warmup_epochs" in config) == (config["optimizer.schedule"] == "cosine")


def test_tpe_proposes_most_of_the_quick_search():
    """quick.yaml runs 8 trials: with Optuna's default start-up (10 random trials) TPE would
    propose none of them. posetune's `auto` start-up leaves it 6 of 8."""
    space, _ = load_space("search_spaces/quick.yaml")
    assert space.search.resolved_startup_trials == 2
    calls = mock.patch.object(
        optuna.samplers.RandomSampler, "sample_independent", autospec=True, side_effect=REAL_RANDOM_DRAW
    )
    with calls as random_draws:
        run_searcher(space, space.search.num_samples)
    random_trials = {call.args[2].number for call in random_draws.call_args_list}
    # Trial 0 is the initial point (no sampling); trial 1 is TPE's second start-up trial; the
    # other six are TPE's own proposals, which never fall back to random draws.
    assert random_trials == {1}, sorted(random_trials)
