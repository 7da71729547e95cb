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
    """Curves that improve with samples and are best near lr 3e-3; lr above 2e-2 diverges.
    The better half has a second training seed, 10% worse at every evaluation."""
    configs = []
    for index, params in enumerate(bench.design(count)):
        lr = params["optimizer.lr"]
        quality = 1 + 4 * abs(math.log10(lr / 3e-3))
        diverges = lr > 2e-2
        milestones = range(1024, (3 * 1024 if diverges else 18432) + 1, 1024)
        runs = [
            {
                "seed": seed,
                "curve": [
                    {"samples": m, "pose_error": (1 + seed / 10) * quality * (1 + 4096 / m), "seconds": m / 200}
                    for m in milestones
                ],
                "diverged_at": 3500 if diverges else None,
            }
            for seed in range(2 if quality < 3 else 1)
        ]
        configs.append({"index": index, "params": params, "runs": runs})
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


@pytest.mark.parametrize("strategy", ["posetune", "random", "tpe_asha_complete", "posetune_plain_asha"])
def test_replay_spends_its_budget_as_tune_would(bench, recording, strategy):
    """12 full trials: enough for the 5 finished trials the file's rung trust needs first."""
    unit = bench.recording_budget(recording)
    budget = 12 * unit
    trace = bench.replay(recording, strategy, seed=0, budget=budget, concurrency=2)
    assert budget <= trace.spent[-1] < budget + unit and trace.spent == sorted(trace.spent)
    assert trace.best == sorted(trace.best, reverse=True) and math.isfinite(trace.best[-1])
    settings, searcher = (bench.STRATEGIES | bench.CANDIDATES)[strategy]
    scheduler = "fifo" if "search.scheduler=fifo" in settings else "asha"
    told = "complete" if searcher == "stock" else "pruned"
    finished = [samples for samples in trace.ended if samples == unit]
    stopped = [samples for samples in trace.ended if samples != unit]
    if scheduler == "fifo":  # every trial that ended trained its whole budget, or diverged
        assert all(samples == 3500 for samples in stopped)
    else:  # ASHA stops at its rungs (2,048 and 6,144 samples), a diverged trial where it diverged
        assert stopped and set(stopped) <= {2048, 6144, 3500}
        assert trace.trials > budget // unit  # early stopping bought more trials
        first_stop = next(i for i, samples in enumerate(trace.ended) if samples in (2048, 6144))
        finished_before = trace.ended[:first_stop].count(unit)
        if "search.asha.rung_correlation=null" in settings:  # Ray's ASHA: stops before anything finished
            assert finished_before == 0
        else:  # rung trust: a rung stops trials once 5 finished trials showed it ranks them well
            assert finished_before >= 5
    # How stopped trials are told to Optuna: posetune's choice (pruned) or Ray's stock one.
    if told == "pruned":
        assert trace.told.get("PRUNED", 0) == len(stopped) and trace.told.get("COMPLETE", 0) == len(finished)
    else:
        assert trace.told.get("PRUNED", 0) == 0 and trace.told["COMPLETE"] == len(trace.ended)


def test_a_trial_trains_as_one_recorded_seed_and_is_worth_its_configurations_seed_mean(bench, recording):
    entry = next(e for e in recording.configs if len(e["runs"]) == 2)
    first, second = (recording(entry["params"], seed) for seed in (0, 1))
    assert first.points != second.points  # the trial's seed picks the run
    ends = [bench.end_value(run, "pose_error") for run in entry["runs"]]
    assert first.score == second.score == pytest.approx((ends[0] + ends[1]) / 2)
    assert ends[1] == pytest.approx(1.1 * ends[0])  # the mean of the last 3 evaluations
    assert first.config == second.config == entry["index"]  # one configuration, not two
    diverged = next(e for e in recording.configs if e["runs"][0]["diverged_at"] is not None)
    assert math.isinf(recording.truth[diverged["index"]])


def test_planted_checks_pass_and_a_harness_that_miscounts_cost_fails_them(bench, recording):
    strategies = ["random", *bench.PLANTED]
    curves = bench.regret_curves(recording, strategies, seeds=30, full_trials=16, concurrency=2)
    budgets = bench.grid(16)
    ratios = bench.budget_ratios(curves, budgets)["strategies"]
    checks = bench.planted_checks(curves, budgets, ratios)
    assert all(check["ok"] for check in checks.values()), checks
    assert ratios["random"]["ratio"] <= 1.0
    # A harness that forgot the half cost, or a band that is no better: random again under their names.
    broken_curves = curves | dict.fromkeys(bench.PLANTED, curves["random"])
    broken = bench.planted_checks(broken_curves, budgets, bench.budget_ratios(broken_curves, budgets)["strategies"])
    assert not any(check["ok"] for check in broken.values()), broken


def test_the_replay_command_writes_its_figures_with_versions_and_planted_checks(bench, tmp_path):
    """On the committed recording, small: every strategy, budgets to 16, two resampled tables."""
    import json
    import subprocess

    command = [sys.executable, str(REPO / "benchmarks" / "search_efficiency.py"), "replay", "--seeds", "12"]
    command += ["--trials", "16", "--tables", "2", "--table-seeds", "4", "--results", str(tmp_path)]
    subprocess.run(command, check=True, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    figures = json.loads((tmp_path / "search_efficiency.json").read_text())
    assert {"ray", "optuna", "torch"} <= set(figures["versions"]) and figures["recording_versions"]
    assert set(figures["strategies"]) == set(bench.STRATEGIES) | set(bench.PLANTED) | set(bench.CANDIDATES)
    assert all(check["ok"] for check in figures["planted"].values())
    assert figures["budgets"] == [2, 4, 8, 16] and figures["over_configurations"]["tables"] == 2
    assert (tmp_path / "search_efficiency.png").stat().st_size > 0 and (tmp_path / "search_efficiency.md").exists()
