"""The search-efficiency benchmark's replay (benchmarks/search_efficiency.py) on a made-up
recording: it drives posetune's own searcher and scheduler as Tune does, spends exactly its
budget, and ASHA stops trials only at rungs. (The recorded figures are the benchmark's.)"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("search_efficiency", REPO / "benchmarks" / "search_efficiency.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def made_up_recording(bench, count: int = 24) -> dict:
    """Curves that improve with samples and are best near lr 3e-3; lr above 2e-2 diverges."""
    configs = []
    for index, params in enumerate(bench.design(count)):
        lr = params["optimizer.lr"]
        quality = 1 + 4 * abs(math.log10(lr / 3e-3))
        diverges = lr > 2e-2
        milestones = range(1024, (3 * 1024 if diverges else 18432) + 1, 1024)
        curve = [{"samples": m, "pose_error": quality * (1 + 4096 / m), "seconds": m / 200} for m in milestones]
        configs.append({"index": index, "params": params, "curve": curve, "diverged_at": 3500 if diverges else None})
    return {"configs": configs, "metric": "pose_error"}


@pytest.fixture(scope="module")
def recording(bench):
    from posetune.search.space import load_space

    space, _ = load_space(bench.SPACE_FILE)
    return bench.Recording(made_up_recording(bench), space)


def test_a_sampled_configuration_trains_as_the_nearest_recorded_one(bench, recording):
    recorded = recording.configs[5]["params"]
    nearby = {**recorded, "optimizer.lr": recorded["optimizer.lr"] * 1.01}
    assert recording.nearest(nearby)["params"] == recorded
    other_batch = {**recorded, "train.batch_size": 48 - recorded["train.batch_size"]}
    assert recording.nearest(other_batch)["params"]["train.batch_size"] == other_batch["train.batch_size"]


@pytest.mark.parametrize("strategy", ["posetune", "random", "tpe_asha_complete"])
def test_replay_spends_its_budget_as_tune_would(bench, recording, strategy):
    unit = bench.recording_budget(recording)
    budget = 6 * unit
    trace = bench.replay(recording, strategy, seed=0, budget=budget, concurrency=2)
    assert budget <= trace.spent[-1] < budget + unit and trace.spent == sorted(trace.spent)
    assert trace.best == sorted(trace.best, reverse=True) and math.isfinite(trace.best[-1])
    _, scheduler, told = bench.STRATEGIES[strategy]
    finished = [samples for samples in trace.ended if samples == unit]
    stopped = [samples for samples in trace.ended if samples != unit]
    if scheduler == "fifo":  # every trial that ended trained its whole budget, or diverged
        assert all(samples == 3500 for samples in stopped)
    else:  # ASHA stops at its rungs (2,048 and 6,144 samples), a diverged trial where it diverged
        assert stopped and set(stopped) <= {2048, 6144, 3500}
        assert trace.trials > budget // unit  # early stopping bought more trials
    # How stopped trials are told to Optuna: posetune's choice (pruned) or Ray's stock one.
    if told == "pruned":
        assert trace.told.get("PRUNED", 0) == len(stopped) and trace.told.get("COMPLETE", 0) == len(finished)
    else:
        assert trace.told.get("PRUNED", 0) == 0 and trace.told["COMPLETE"] == len(trace.ended)


def test_summary_compares_every_strategy_with_random_search(bench, recording):
    unit = bench.recording_budget(recording)
    traces = {
        name: [bench.replay(recording, name, seed, 4 * unit, 2) for seed in range(2)] for name in ("random", "posetune")
    }
    summary = bench.summarise(traces, 4 * unit)
    assert summary["strategies"]["random"]["ratio_to_random"] == 1.0
    for figures in summary["strategies"].values():
        assert {"median_budget_to_target", "ratio_to_random", "median_final_best", "median_trials"} <= set(figures)
