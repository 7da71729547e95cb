"""A search replayed on a simulated clock, driven as Tune drives posetune's searcher and scheduler.

Shared by benchmarks/search_efficiency.py (posetune's own recorded task) and benchmarks/external.py
(public benchmarks). No Ray cluster is started: the searcher (`build_searcher`, or a stock one)
and the scheduler (`build_scheduler`) are called as Tune's trial loop calls them, `concurrency`
trials at a time, each trial advancing by the seconds its curve records per evaluation.

A *recording* is any function from (params, seed) to a learning curve: a table of trained
configurations, a synthetic function evaluated at fidelities, or recorded training runs. `seed`
is drawn per trial from the search's seed, so a repeated configuration may train as a new seed.
"""

from __future__ import annotations

import bisect
import collections
import heapq
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np


@dataclass
class Curve:
    """What one trial reports: its evaluations in order of samples seen.

    Each point is {"samples": samples seen, METRIC: value, "seconds": from the trial's start};
    a diverged trial's last point also holds "diverged": 1 (and what it reports to Tune)."""

    points: list[dict[str, float]]
    config: Hashable = None  # which recorded configuration it trained as (counts distinct ones)
    score: float | None = None  # what the user gets from it (de-noised, full budget); None: its best evaluation


Recording = Callable[[dict[str, Any], int], Curve]


@dataclass
class Trace:
    """One replayed search, after every evaluation: samples spent, the best metric so far and
    the score of the trial that holds it (the incumbent, as posetune ranks trials)."""

    spent: list[int] = field(default_factory=list)
    best: list[float] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    trials: int = 0
    ended: list[int] = field(default_factory=list)  # samples at which each ended trial stopped
    told: dict[str, int] = field(default_factory=dict)  # Optuna trial states, counted
    configs: set = field(default_factory=set)  # the recorded configurations its trials trained as

    def best_at(self, budget: float) -> float:
        i = bisect.bisect_right(self.spent, budget) - 1
        return self.best[i] if i >= 0 else math.inf

    def score_at(self, budget: float) -> float:
        i = bisect.bisect_right(self.spent, budget) - 1
        return self.score[i] if i >= 0 else math.inf

    def budget_to_reach(self, target: float) -> float:
        return next((spent for spent, best in zip(self.spent, self.best, strict=True) if best <= target), math.inf)


def replay(
    space,
    recording: Recording,
    seed: int,
    budget: float,
    concurrency: int,
    trials: int | None = None,
    searcher=None,
) -> Trace:
    """One search of `space` (a posetune SearchSpace: its search settings build the searcher and
    the scheduler) over `recording`. It ends when it has spent `budget` samples, or after
    `trials` trials (as search.num_samples does). `searcher`: a stock one instead of posetune's."""
    from posetune.search.searchers import build_scheduler, build_searcher

    s = space.search
    scheduler = build_scheduler(space)
    scheduler.set_search_properties(s.metric, s.resolved_mode)
    np.random.seed(seed)  # ASHA picks a bracket with numpy's global generator
    run = _Replay(searcher or build_searcher(space), scheduler, recording, s.metric, s.resolved_mode, seed)
    return run.until(budget, concurrency, trials)


class _Replay:
    """The trial loop: start trials, deliver their evaluations in simulated-clock order, and
    let the scheduler stop them and the searcher learn from them, as Tune does."""

    def __init__(self, searcher, scheduler, recording: Recording, metric: str, mode: str, seed: int):
        self.searcher, self.scheduler, self.recording = searcher, scheduler, recording
        self.metric, self.sign = metric, 1.0 if mode == "min" else -1.0
        self.trial_seeds = np.random.default_rng(seed)  # the recording's seed for each trial
        self.trace = Trace()
        self.running: list[tuple[float, int, str, int]] = []  # (time of next report, tiebreak, trial id, index)
        self.curves: dict[str, Curve] = {}
        self.started: dict[str, float] = {}  # when each trial started, on the simulated clock
        self.count = 0
        self.spent, self.best, self.score = 0, math.inf, math.inf  # best: sign x metric

    def start(self, now: float) -> None:
        trial_id = f"t{self.count:04d}"
        self.count += 1
        params = self.searcher.suggest(trial_id)
        curve = self.recording(params, int(self.trial_seeds.integers(2**31)))
        self.trace.configs.add(curve.config)
        self.curves[trial_id], self.started[trial_id] = curve, now
        self.scheduler.on_trial_add(None, SimpleNamespace(trial_id=trial_id))
        heapq.heappush(self.running, (now + curve.points[0]["seconds"], self.count, trial_id, 0))

    def until(self, budget: float, concurrency: int, trials: int | None) -> Trace:
        from ray.tune.schedulers import TrialScheduler

        from posetune import internals

        for _ in range(min(concurrency, trials or concurrency)):
            self.start(0.0)
        while self.running and self.spent < budget:
            now, _, trial_id, k = heapq.heappop(self.running)
            curve = self.curves[trial_id]
            result = self.deliver(curve, k)
            trial = SimpleNamespace(trial_id=trial_id)
            decision = self.scheduler.on_trial_result(None, trial, result)
            if decision != TrialScheduler.STOP:
                self.searcher.on_trial_result(trial_id, result)
            if decision == TrialScheduler.STOP or k == len(curve.points) - 1:
                self.scheduler.on_trial_complete(None, trial, result)
                self.searcher.on_trial_complete(trial_id, result)
                self.trace.ended.append(curve.points[k]["samples"])
                if self.spent < budget and self.count < (trials or math.inf):
                    self.start(now)
            else:
                next_time = self.started[trial_id] + curve.points[k + 1]["seconds"]
                heapq.heappush(self.running, (next_time, self.count, trial_id, k + 1))
        self.trace.trials = self.count
        states = internals.searcher_study(self.searcher).trials
        self.trace.told = dict(collections.Counter(t.state.name for t in states))
        return self.trace

    def deliver(self, curve: Curve, k: int) -> dict[str, Any]:
        """Spend the evaluation's samples, update the incumbent, and return Tune's result."""
        point = curve.points[k]
        self.spent += point["samples"] - (curve.points[k - 1]["samples"] if k else 0)
        value = point[self.metric]
        result = {self.metric: value, "samples_seen": point["samples"], "training_iteration": k + 1}
        if "diverged" in point:
            result["diverged"] = 1
        elif self.sign * value < self.best:
            self.best = self.sign * value
            self.score = value if curve.score is None else curve.score
        self.trace.spent.append(self.spent)
        self.trace.best.append(self.sign * self.best)
        self.trace.score.append(self.score)
        return result
