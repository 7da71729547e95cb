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
PLAIN_ASHA = ["search.asha.rung_correlation=null", "search.asha.brackets=1"]  # Ray's ASHA, one bracket


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


def test_a_diverged_trial_leaves_ashas_cut_off_to_the_trials_that_trained():
    """One normal and one diverged result at a rung: a later, worse trial is stopped there.
    (With a finite "worst score" for the diverged one the cut-off was half-way to it, about
    -5e8, and nothing was ever stopped at that rung again.)"""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from posetune.choices import diverged_result
    from posetune.search.searchers import build_scheduler

    space, _ = load_space("search_spaces/quick.yaml", PLAIN_ASHA)
    rung = space.search.asha.grace_samples
    scheduler = build_scheduler(space)
    scheduler.set_search_properties(space.search.metric, space.search.resolved_mode)  # as Tune does
    trials = [SimpleNamespace(trial_id=name) for name in ("good", "diverged", "worse")]
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    good = scheduler.on_trial_result(None, trials[0], {"pose_error": 10.0, "samples_seen": rung})
    scheduler.on_trial_result(None, trials[1], diverged_result("pose_error", "loss is nan", rung))
    worse = scheduler.on_trial_result(None, trials[2], {"pose_error": 20.0, "samples_seen": rung})
    assert good == TrialScheduler.CONTINUE and worse == TrialScheduler.STOP


def test_a_diverged_trial_ranks_below_every_stopped_trial_in_optuna():
    """TPE ranks pruned trials by their last step first: a trial that diverged late is told
    PRUNED with only the worst score at step 0, below one stopped at the first rung; a stopped
    trial's curve reaches Optuna whole, once per step."""
    from posetune.choices import DIVERGED_SCORE, diverged_result

    space, _ = load_space("search_spaces/quick.yaml")
    step, budget = 4000, space.search.asha.max_samples  # quick.yaml evaluates every 4,000 samples
    searcher = build_searcher(space)
    for name in ("stopped", "diverged"):
        searcher.suggest(name)
    searcher.on_trial_result("stopped", {"pose_error": 15.0, "samples_seen": step})
    searcher.on_trial_result("stopped", {"pose_error": 15.0, "samples_seen": step})  # re-reported after a resume
    searcher.on_trial_complete("stopped", {"pose_error": 14.0, "samples_seen": 2 * step})
    for k in range(1, budget // step):
        searcher.on_trial_result("diverged", {"pose_error": 12.0, "samples_seen": k * step})
    searcher.on_trial_complete("diverged", diverged_result("pose_error", "loss is nan", budget - 1))
    stopped, diverged = searcher._ot_study.trials
    assert stopped.state.name == diverged.state.name == "PRUNED"
    assert stopped.intermediate_values == {step: 15.0, 2 * step: 14.0}
    assert diverged.intermediate_values == {0: DIVERGED_SCORE}


def test_a_failed_trial_run_again_by_retry_failed_reaches_optuna():
    """Optuna was told FAIL; --retry-failed ran it again and it completed: its outcome is in
    the study (a trial of the same parameters), so TPE learns from it."""
    space, _ = load_space("search_spaces/quick.yaml")
    budget = space.search.asha.max_samples
    searcher = build_searcher(space)
    searcher.suggest("t")
    searcher.on_trial_complete("t", None, error=True)
    searcher.on_trial_result("t", {"pose_error": 4.0, "samples_seen": 4000})
    searcher.on_trial_complete("t", {"pose_error": 3.0, "samples_seen": budget})
    failed, again = searcher._ot_study.trials
    assert failed.state.name == "FAIL" and again.state.name == "COMPLETE" and again.value == 3.0
    assert again.params == failed.params and again.intermediate_values == {4000: 4.0, budget: 3.0}


def test_the_limiter_passes_on_the_end_of_a_trial_it_did_not_suggest():
    """Tune restarts the trials a --retry-failed resume reruns without asking the searcher; Ray's
    ConcurrencyLimiter dropped their ends. The search's limiter hands them to Optuna."""
    from posetune.search.searchers import build_search_alg

    space, _ = load_space("search_spaces/quick.yaml")
    limiter = build_search_alg(space, concurrency=1)
    limiter.suggest("t")
    limiter.on_trial_complete("t", None, error=True)  # the first run: it failed
    assert limiter.suggest("next") is not None  # its slot was freed
    limiter.on_trial_result("t", {"pose_error": 4.0, "samples_seen": 4000})  # run again
    limiter.on_trial_complete("t", {"pose_error": 3.0, "samples_seen": space.search.asha.max_samples})
    states = [t.state.name for t in limiter.searcher._ot_study.trials]
    assert states.count("FAIL") == 1 and states.count("COMPLETE") == 1, states


def test_asha_lets_a_trial_at_the_budget_end_on_its_own():
    """Ray's ASHA answers STOP to the budget's report, and Tune's stop kills Ray Train's controller
    before it withdraws its autoscaler request (the nodes then stay up 180 s); below the budget,
    ASHA's cut-offs are unchanged."""
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from posetune.search.searchers import build_scheduler

    space, _ = load_space("search_spaces/quick.yaml", PLAIN_ASHA)
    asha = space.search.asha
    stock = ASHAScheduler(
        time_attr="samples_seen",
        max_t=asha.max_samples,
        grace_period=asha.grace_samples,
        reduction_factor=asha.reduction_factor,
    )
    decisions = {}
    for name, scheduler in (("posetune", build_scheduler(space)), ("ray", stock)):
        scheduler.set_search_properties(space.search.metric, space.search.resolved_mode)
        trials = [SimpleNamespace(trial_id=t) for t in ("good", "worse", "last")]
        for trial in trials:
            scheduler.on_trial_add(None, trial)
        rung = [
            scheduler.on_trial_result(None, t, {"pose_error": e, "samples_seen": asha.grace_samples})
            for t, e in zip(trials, (10.0, 20.0, 5.0), strict=True)
        ]
        final = scheduler.on_trial_result(None, trials[2], {"pose_error": 5.0, "samples_seen": asha.max_samples})
        decisions[name] = (rung, final)
    assert decisions["posetune"][0] == decisions["ray"][0]
    assert decisions["ray"][1] == TrialScheduler.STOP and decisions["posetune"][1] == TrialScheduler.CONTINUE


def test_a_rung_stops_trials_only_once_it_has_ranked_finished_trials_well():
    """asha.rung_correlation: before `rung_evidence` trials have finished, and while the rung's
    values rank their final values worse than asked, a trial below the cut-off passes the rung;
    once finished trials show the rung ranks well, the same result is stopped."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from posetune.search.searchers import build_scheduler

    gated = ["search.asha.rung_correlation=0.5", "search.asha.rung_evidence=3", "search.asha.brackets=1"]
    space, _ = load_space("search_spaces/quick.yaml", gated)
    asha = space.search.asha
    rung, budget = asha.grace_samples, asha.max_samples

    def scheduler_after(finished: list[tuple[float, float]]):
        """A scheduler that has seen these (rung value, final value) trials finish."""
        scheduler = build_scheduler(space)
        scheduler.set_search_properties(space.search.metric, space.search.resolved_mode)
        for i, (at_rung, final) in enumerate(finished):
            trial = SimpleNamespace(trial_id=f"f{i}")
            scheduler.on_trial_add(None, trial)
            scheduler.on_trial_result(None, trial, {"pose_error": at_rung, "samples_seen": rung})
            scheduler.on_trial_result(None, trial, {"pose_error": final, "samples_seen": budget})
        return scheduler

    def decision(scheduler) -> str:
        late = SimpleNamespace(trial_id="late")
        scheduler.on_trial_add(None, late)
        return scheduler.on_trial_result(None, late, {"pose_error": 99.0, "samples_seen": rung})

    ranks_well = [(1.0, 1.0), (2.0, 2.0), (3.0, 3.0)]
    ranks_badly = [(1.0, 3.0), (2.0, 2.0), (3.0, 1.0)]
    assert decision(scheduler_after(ranks_well[:2])) == TrialScheduler.CONTINUE  # too little evidence yet
    assert decision(scheduler_after(ranks_badly)) == TrialScheduler.CONTINUE  # Spearman -1
    assert decision(scheduler_after(ranks_well)) == TrialScheduler.STOP  # Spearman 1: ASHA's cut-off stands
    plain, _ = load_space("search_spaces/quick.yaml", PLAIN_ASHA)  # Ray's ASHA: stops at once
    scheduler = build_scheduler(plain)
    scheduler.set_search_properties(plain.search.metric, plain.search.resolved_mode)
    for name, value in (("a", 1.0), ("late", 99.0)):
        scheduler.on_trial_add(None, SimpleNamespace(trial_id=name))
        last = scheduler.on_trial_result(
            None, SimpleNamespace(trial_id=name), {"pose_error": value, "samples_seen": rung}
        )
    assert last == TrialScheduler.STOP


def test_a_scheduler_pickled_before_rung_trust_still_judges_trials():
    """Tune restores the scheduler it pickled when the search started (tuner.pkl): one from an
    earlier posetune has none of rung trust's attributes, and must stay Ray's ASHA."""
    import pickle
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from posetune.search.searchers import build_scheduler

    space, _ = load_space("search_spaces/quick.yaml", PLAIN_ASHA)
    scheduler = build_scheduler(space)
    scheduler.set_search_properties(space.search.metric, space.search.resolved_mode)
    for name in ("rung_correlation", "evidence", "rungs", "at_rung", "final"):  # as an earlier version pickled it
        del scheduler.__dict__[name]
    restored = pickle.loads(pickle.dumps(scheduler))
    rung = space.search.asha.grace_samples
    decisions = []
    for name, value in (("a", 1.0), ("b", 99.0)):
        trial = SimpleNamespace(trial_id=name)
        restored.on_trial_add(None, trial)
        decisions.append(restored.on_trial_result(None, trial, {"pose_error": value, "samples_seen": rung}))
    assert decisions == [TrialScheduler.CONTINUE, TrialScheduler.STOP]


def test_the_study_is_read_back_from_tunes_saved_searcher_state_without_importing_torch(tmp_path):
    """The end of every search reads the study from the searcher state Tune saved; reading it
    must not import the training code (torch and torchvision were seconds of every search's end)."""
    import subprocess
    import sys

    space, _ = load_space("search_spaces/quick.yaml")
    searcher = build_searcher(space)
    for trial in ("a", "b"):
        searcher.suggest(trial)
        searcher.on_trial_complete(trial, {"pose_error": 3.0, "samples_seen": space.search.asha.max_samples})
    (tmp_path / "tune").mkdir()
    searcher.save(str(tmp_path / "tune" / "searcher-state-2026-01-01_00-00-00.pkl"))  # as Tune names it
    code = (
        "import sys\n"
        "from posetune.search.run import load_study\n"
        f"study = load_study({str(tmp_path)!r})\n"
        "assert [t.state.name for t in study.trials] == ['COMPLETE', 'COMPLETE'], study.trials\n"
        "assert 'torch' not in sys.modules, 'reading the study imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
