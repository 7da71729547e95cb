"""The searcher and the scheduler of a search.

Searcher: an Optuna sampler (TPE by default; random, GP, CMA-ES, QMC) through Ray's OptunaSearch, with
a define-by-run space (conditional parameters). Scheduler: ASHA on *training samples seen*, so
trials with different batch sizes are stopped at equal compute (or FIFO: no early stopping).
A trial that ASHA stops is told to Optuna as PRUNED (``BudgetAwareOptunaSearch``), never as a
finished trial with an under-trained score. ``build_search_alg`` adds the concurrency limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from posetune import internals
from posetune.choices import DIVERGED_SCORE
from posetune.search.space import Asha, DefineByRun, SearchSettings, SearchSpace

# search.searcher: the Optuna sampler, made from the search's settings. Its names are
# posetune.choices.SEARCHERS (a test keeps the two equal). Model-based samplers start with
# search.startup_trials random trials (see SearchSettings.resolved_startup_trials).
SAMPLERS: dict[str, Callable[[SearchSettings], optuna.samplers.BaseSampler]] = {
    "cmaes": lambda s: optuna.samplers.CmaEsSampler(
        seed=s.seed, n_startup_trials=s.resolved_startup_trials, warn_independent_sampling=False
    ),
    "gp": lambda s: optuna.samplers.GPSampler(
        seed=s.seed, n_startup_trials=s.resolved_startup_trials, warn_independent_sampling=False
    ),
    "qmc": lambda s: optuna.samplers.QMCSampler(seed=s.seed, warn_independent_sampling=False),
    "random": lambda s: optuna.samplers.RandomSampler(seed=s.seed),
    # Multivariate TPE with the constant liar, set here rather than taken from the installed
    # Optuna (5.0 turned both on, 4.x had them off): univariate TPE was behind on every public
    # table (benchmarks/README.md, posetune_univariate).
    "tpe": lambda s: optuna.samplers.TPESampler(
        seed=s.seed, n_startup_trials=s.resolved_startup_trials, multivariate=True, constant_liar=True
    ),
}


MODEL_BASED = frozenset({"cmaes", "gp", "tpe"})  # the samplers that use startup_trials


def list_samplers() -> list[str]:
    return sorted(SAMPLERS)


class BudgetAwareOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, made to match an ASHA budget in samples seen.

    - Intermediate values are at step = samples seen: Tune's training_iteration restarts at 1
      after a resume and means different compute for different batch sizes. They are kept
      here while a trial runs and given to Optuna when it ends (TPE reads only ended trials).
    - A trial that ends before the budget (stopped by ASHA) is told as PRUNED. Ray tells it
      COMPLETE with its partial score, so TPE would learn from under-trained values as if they
      were final; Optuna's TPE ranks pruned trials below complete ones, by how far they got
      (their last step) and then by their last value.
    - A diverged trial is told as PRUNED with one value, the worst score
      (choices.DIVERGED_SCORE), at step 0: its region of the space counts as bad, and it ranks
      below every trial that was stopped with a real score, however late it diverged.
    """

    def __init__(self, *args, budget: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._budget = budget
        self._curves: dict[str, dict[int, float]] = {}  # trial id -> {samples seen: metric}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        step = result.get("samples_seen")
        if result.get("diverged") or step is None or self.metric not in result:
            return
        # The first value at a step stays: a trial re-reported at its last checkpoint after a
        # resume repeats its step.
        self._curve(trial_id).setdefault(int(step), float(result[self.metric]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        told = internals.searcher_told(self)
        if result and not error:  # ASHA's stopping result arrives here, not through on_trial_result
            self.on_trial_result(trial_id, result)
        if trial_id in told:  # failed before, run again by --retry-failed
            self._tell_again(trial_id, result, error)
            return
        trial = internals.searcher_trial(self, trial_id)
        for step, value in sorted(self._steps(trial_id, result).items()):
            trial.report(value, step)
        if error or not result or not (result.get("diverged") or self._stopped(result)):
            super().on_trial_complete(trial_id, result, error)
            return
        internals.searcher_study(self).tell(trial, state=TrialState.PRUNED)
        told.add(trial_id)

    def _steps(self, trial_id: str, result: dict | None) -> dict[int, float]:
        """What Optuna gets as the trial's intermediate values."""
        if result and result.get("diverged"):
            return {0: -DIVERGED_SCORE if self.mode == "max" else DIVERGED_SCORE}
        return self._curve(trial_id)

    def _stopped(self, result: dict) -> bool:
        return result.get("samples_seen", 0) < self._budget

    def _tell_again(self, trial_id: str, result: dict | None, error: bool) -> None:
        """Optuna cannot tell a finished trial twice: the new outcome of a failed trial that
        --retry-failed ran again is added as a trial of the same parameters."""
        study = internals.searcher_study(self)
        before = study.trials[internals.searcher_trial(self, trial_id).number]
        if error or not result or before.state is not TrialState.FAIL:
            return
        partial = bool(result.get("diverged")) or self._stopped(result)
        study.add_trial(
            optuna.trial.create_trial(
                params=before.params,
                distributions=before.distributions,
                value=None if partial else float(result[self.metric]),
                state=TrialState.PRUNED if partial else TrialState.COMPLETE,
                intermediate_values=self._steps(trial_id, result),
            )
        )

    def _curve(self, trial_id: str) -> dict[int, float]:
        # A searcher state saved before _curves existed is restored into __dict__ without it.
        return self.__dict__.setdefault("_curves", {}).setdefault(trial_id, {})


def build_searcher(space: SearchSpace) -> BudgetAwareOptunaSearch:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = space.search
    return BudgetAwareOptunaSearch(
        space=DefineByRun(space),
        metric=s.metric,
        mode=s.resolved_mode,
        sampler=SAMPLERS[s.searcher](s),
        points_to_evaluate=[dict(point) for point in s.points_to_evaluate] or None,
        budget=s.asha.max_samples,
    )


class ResumeAwareLimiter(ConcurrencyLimiter):
    """Ray's ConcurrencyLimiter, passing on the end of a trial it did not suggest.

    A ``--retry-failed`` resume runs failed trials again that Tune restarts itself, never
    through ``suggest``; Ray's limiter drops their ends, so Optuna never learned how they went.
    (How many of them train at once is held by the trials' own slots: search.trial.TrainingSlots.)
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.live_trials:
            super().on_trial_complete(trial_id, result=result, error=error)
        else:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)


def build_search_alg(space: SearchSpace, concurrency: int) -> ResumeAwareLimiter:
    """The searcher behind the concurrency limit: ``concurrency`` trials suggested at once."""
    return ResumeAwareLimiter(build_searcher(space), max_concurrent=concurrency)


class BudgetASHA(ASHAScheduler):
    """ASHA on samples seen that lets a trial at the budget end on its own, and stops at a
    rung only once that rung has been seen to rank trials well (when `rung_correlation` is set).

    Ray's ASHA stops a trial when it reports the budget (max_t), a moment before the trial
    would return. When the stop wins that race, Tune kills the trial's driver, and with it Ray
    Train's controller before it can withdraw its request to the autoscaler, which then keeps
    the trial's worker nodes up for 180 s more (Train's AUTOSCALING_REQUESTS_EXPIRE_TIME_S).
    Every trial ends at the budget anyway (fit stops there), so nothing trains longer.

    Rung trust: early rungs of some tasks rank configurations badly (a cosine schedule judged
    at its peak learning rate, a warm-up), and ASHA then stops the best trials. With
    `rung_correlation` set, a rung's STOP stands only once `evidence` trials have reached the
    budget and their values at that rung rank their final values with at least that Spearman
    correlation; until then, and while it ranks worse, trials pass it (their values still set
    its cut-off). Below the budget the rungs and cut-offs are Ray's."""

    def __init__(
        self,
        *,
        budget: int,
        grace: int,
        reduction_factor: float,
        brackets: int = 1,
        rung_correlation: float | None = None,
        evidence: int = 5,
    ):
        super().__init__(
            time_attr="samples_seen",
            max_t=budget,
            grace_period=grace,
            reduction_factor=reduction_factor,
            brackets=brackets,
        )
        self.budget, self.rung_correlation, self.evidence = budget, rung_correlation, evidence
        rungs = Asha(max_samples=budget, grace_samples=grace, reduction_factor=reduction_factor).rungs()
        self.rungs = [rung for rung in rungs if rung < budget]  # a trial at the budget is never stopped
        self.at_rung: dict[float, dict[str, float]] = {rung: {} for rung in self.rungs}
        self.final: dict[str, float] = {}
        if rung_correlation is not None:  # scipy takes 0.8 s to import: now, not inside Tune's result loop
            import scipy.stats  # noqa: F401

    def __setstate__(self, state: dict) -> None:
        """A resumed search restores the scheduler Tune pickled when it started; one pickled by
        an earlier posetune had Ray's ASHA only, and no rung-trust state."""
        self.__dict__.update({"rung_correlation": None, "evidence": 5, "rungs": [], "at_rung": {}, "final": {}})
        self.__dict__.update(state)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        samples, value = result.get("samples_seen", 0), result.get(self._metric)
        if samples >= self.budget:
            if value is not None and math.isfinite(value):
                self.final[trial.trial_id] = value
            return TrialScheduler.CONTINUE
        crossed = [r for r in self.rungs if samples >= r and trial.trial_id not in self.at_rung[r]]
        for rung in crossed:
            self.at_rung[rung][trial.trial_id] = math.nan if value is None else value
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and crossed and not self.trusted(crossed[-1]):
            return TrialScheduler.CONTINUE
        return decision

    def trusted(self, rung: float) -> bool:
        """Whether a STOP at `rung` stands: always without a rung_correlation, else once the
        rung's values rank the finished trials' final values well enough."""
        if self.rung_correlation is None:
            return True
        correlation = rung_rank_correlation(self.at_rung[rung], self.final, self.evidence)
        return correlation is not None and correlation >= self.rung_correlation


def rung_rank_correlation(at_rung: dict[str, float], final: dict[str, float], evidence: int) -> float | None:
    """Spearman correlation of the trials' values at a rung with their final values, over the
    trials that have both (finite); None with fewer than `evidence` of them, or no spread."""
    from scipy.stats import rankdata  # only rung trust needs scipy (imported when the scheduler is built)

    pairs = [(at_rung[t], final[t]) for t in final if t in at_rung and math.isfinite(at_rung[t])]
    if len(pairs) < evidence:
        return None
    ranks = rankdata(np.array(pairs), axis=0)
    if ranks[:, 0].std() == 0 or ranks[:, 1].std() == 0:
        return None
    return float(np.corrcoef(ranks[:, 0], ranks[:, 1])[0, 1])


def _asha(space: SearchSpace) -> TrialScheduler:
    asha = space.search.asha
    return BudgetASHA(
        budget=asha.max_samples,
        grace=asha.grace_samples,
        reduction_factor=asha.reduction_factor,
        brackets=asha.brackets,
        rung_correlation=asha.rung_correlation,
        evidence=asha.rung_evidence,
    )


# search.scheduler: names are posetune.choices.SCHEDULERS (a test keeps the two equal).
SCHEDULERS: dict[str, Callable[[SearchSpace], TrialScheduler]] = {
    "asha": _asha,
    "fifo": lambda space: FIFOScheduler(),  # no early stopping: every trial trains its whole budget
}


def list_schedulers() -> list[str]:
    return sorted(SCHEDULERS)


def build_scheduler(space: SearchSpace) -> TrialScheduler:
    return SCHEDULERS[space.search.scheduler](space)
