"""Regret statistics shared by the replayed benchmarks (external.py, search_efficiency.py).

Every strategy of a benchmark runs the same search seeds, so a comparison between two
strategies resamples the seeds together (paired): the intervals are 95% percentile bootstraps
over seeds, with one fixed set of resamples per seed count.
"""

from __future__ import annotations

import numpy as np

BOOTSTRAP = 1000  # resamples of the seeds for every interval


def resamples(count: int) -> np.ndarray:
    """Bootstrap indices over `count` seeds, the same for every strategy (paired), fixed."""
    return np.random.default_rng(0).integers(count, size=(BOOTSTRAP, count))


def interval(values: np.ndarray, statistic) -> list[list[float]]:
    """The 95% bootstrap interval of `statistic` over seeds, per budget: (seeds, budgets) -> (2, budgets)."""
    boot = statistic(values[resamples(len(values))], axis=1)
    return np.percentile(boot, [2.5, 97.5], axis=0).tolist()


def paired(values: np.ndarray, baseline: np.ndarray, statistic=np.median) -> list[list[float]]:
    """95% interval of statistic(strategy) - statistic(baseline) (the median by default), the
    seeds resampled together."""
    idx = resamples(len(values))
    diff = statistic(values[idx], axis=1) - statistic(baseline[idx], axis=1)
    return np.percentile(diff, [2.5, 97.5], axis=0).T.tolist()


def versus(
    curves: dict[str, np.ndarray], baseline: str, columns: list[int], labels: list[str]
) -> dict[str, dict[str, list[float]]]:
    """Each other strategy's paired interval against `baseline` at the curves' `columns`
    (labelled `labels`; negative: ahead of the baseline)."""
    return {
        s: dict(zip(labels, paired(c[:, columns], curves[baseline][:, columns]), strict=True))
        for s, c in curves.items()
        if s != baseline
    }
