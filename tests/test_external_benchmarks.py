"""The public-benchmark validation (benchmarks/external.py) in small: the ported Hartmann
functions give mfpbench's values, every task runs by name, random search's regret matches its
exact expectation on a table, and the command writes its summary (a few seeds, small budgets;
the reported figures are the benchmark's)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import REPO

# Computed with mf-prior-bench 1.10.0 in its own virtual environment (it pins numpy 1.26):
# mfpbench.get(name, seed=seed).query({"X_0": ..., ...}, at=z).error
MFPBENCH_VALUES = [
    ("mfh3", None, 1, [0.675831, 0.214323, 0.309452], -0.2565549819194148),
    ("mfh3", 7, 7, [0.105386, 0.565731, 0.00463], 0.016772347509870868),
    ("mfh3", 123456789, 100, [0.213157, 0.274245, 0.807182], -1.8747460975646923),
    ("mfh3_good", 7, 1, [0.468019, 0.96493, 0.898227], 3.2132273687078863),
    ("mfh3_good", 123456789, 7, [0.228351, 0.023872, 0.696119], 0.6338854438978391),
    ("mfh3_bad", None, 100, [0.585387, 0.4203, 0.403447], -0.31688030610082435),
    ("mfh3_bad", 123456789, 1, [0.322098, 0.406999, 0.859174], 7.5816950914165915),
    ("mfh6", None, 7, [0.702891, 0.100561, 0.279518, 0.218521, 0.131627, 0.549091], -0.65781572841532),
    ("mfh6", 7, 100, [0.383526, 0.782328, 0.239148, 0.84455, 0.614079, 0.633753], -0.017745902280802094),
    ("mfh6_good", None, 1, [0.369975, 0.563236, 0.906523, 0.23071, 0.149284, 0.134119], 0.2210608303514361),
    ("mfh6_good", 7, 7, [0.839321, 0.626778, 0.889144, 0.087523, 0.217688, 0.907487], 1.3959375092314916),
    ("mfh6_good", 123456789, 100, [0.17802, 0.070346, 0.674701, 0.51597, 0.181225, 0.038456], -0.06855399711672279),
    ("mfh6_bad", 7, 1, [0.059325, 0.214277, 0.81195, 0.55964, 0.836989, 0.380557], 4.2443565879604455),
    ("mfh6_bad", 123456789, 7, [0.22653, 0.322837, 0.933927, 0.647225, 0.126815, 0.309151], 3.284478894508811),
    ("mfh6_terrible", None, 100, [0.122932, 0.201236, 0.926465, 0.875149, 0.693247, 0.141121], -0.008658220338095638),
    ("mfh6_terrible", 123456789, 1, [0.034681, 0.484582, 0.523125, 0.29316, 0.272117, 0.620583], 4.046547919245757),
]
MFPBENCH_OPTIMA = {3: -3.8627797869493365, 6: -3.322368011391339}  # the query at `optimum`, z = 100


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("external", REPO / "benchmarks" / "external.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("name", "seed", "z", "xs", "expected"), MFPBENCH_VALUES)
def test_the_ported_hartmann_functions_give_mfpbench_values(bench, name, seed, z, xs, expected):
    from hartmann import PRESETS, MFHartmann

    dims, preset = int(name[3]), name[5:]
    assert MFHartmann(dims, *PRESETS[preset], seed=seed)(z, tuple(xs)) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("dims", [3, 6])
def test_the_ported_optima_are_mfpbench_optima(bench, dims):
    for preset in ("good", "bad"):
        assert bench.get_task(f"mfh{dims}/{preset}").optimum == pytest.approx(MFPBENCH_OPTIMA[dims], rel=1e-12)


def test_every_package_task_has_a_name(bench):
    names = bench.task_names()
    assert {"hpolib/naval_propulsion", "nasbench201/cifar10", "hpobench/australian", "mfh6/bad", "mfh3"} <= set(names)
    assert len(names) == 8 + 4 + 3 + 2 * 5
    assert bench.get_task("hpolib/naval").name == "hpolib/naval_propulsion"  # a unique prefix is enough
    assert set(bench.REPORTED) <= set(names)
    with pytest.raises(SystemExit, match="unknown task"):
        bench.get_task("hpolib/nope")


def test_a_table_holds_every_grid_configuration_and_its_seeds(bench):
    """Pins the package's private table (read for the true values and the exact calibration)."""
    task = bench.get_task("nasbench201/cifar10")
    assert len(task.table) == 5**6 and all(len(v) in (2, 3) for v in task.table.values())
    params = {name: values[1] for name, values in task.grid.items()}
    assert task.key(params) == "111111" and task.sign == -1.0  # val_acc, maximised: searched as -val_acc
    assert task.true_values["111111"] == pytest.approx(task.table["111111"].mean()) and task.optimum < -90


def test_the_exact_random_regret_is_the_brute_force_expectation(bench):
    """Order statistics over (configuration, seed) draws, ties to the first drawn: on a table
    small enough to enumerate every sequence of 3 draws."""
    table = {"a": np.array([1.0, 3.0]), "b": np.array([1.0]), "c": np.array([2.0, 0.5, 4.0])}
    truths = {k: float(v.mean()) for k, v in table.items()}
    task = SimpleNamespace(table=table, true_values=truths, optimum=min(truths.values()))
    draws = [(k, y, 1 / (3 * len(v))) for k, v in table.items() for y in v]
    expected = 0.0
    for seq in itertools.product(draws, repeat=3):
        first_best = min(seq, key=lambda d: d[1])  # min keeps the first of equal values
        expected += np.prod([d[2] for d in seq]) * (truths[first_best[0]] - task.optimum)
    assert bench.random_expected_regret(task, [3])[0] == pytest.approx(expected, rel=1e-12)
    regrets, probabilities = bench.random_regret_distribution(task, 3)
    assert probabilities.sum() == pytest.approx(1.0) and list(regrets) == sorted(regrets)
    assert bench.ks_distance(np.array([regrets[0]]), regrets, probabilities) == pytest.approx(1 - probabilities[0])


def test_random_search_matches_its_exact_regret_on_a_table(bench):
    task = bench.get_task("hpobench/australian")
    curves = np.array([bench.run_one((task.name, "random", seed, 10, 1)) for seed in range(bench.CALIBRATION_SEEDS)])
    check = bench.calibration(task, curves, [10])
    assert check["ok"] and all(row["mean_in_interval"] for row in check["budgets"]), check
    wrong = curves * 1.5  # a harness whose regrets are half as large again is caught
    assert bench.calibration(task, wrong, [10])["ok"] is False
    assert bench.random_expected_regret(task, [1])[0] == pytest.approx(
        np.mean(list(task.true_values.values())) - task.optimum
    )


def test_the_same_task_and_seed_give_the_same_search(bench):
    job = ("hpolib/protein", "posetune", 3, 12, 1)
    assert bench.run_one(job) == bench.run_one(job)


def test_asha_stops_mfh_trials_at_posetune_rungs_and_charges_their_samples(bench):
    import tune_replay

    task = bench.get_task("mfh3/good")
    space = bench.search_space(task, "posetune", 0, 6)
    unit = space.search.asha.max_samples
    recording = task.recording(unit, bench.default_search()["eval_every"])
    trace = tune_replay.replay(space, recording, 0, 6 * unit, 1)
    rungs = {int(r) for r in space.search.asha.rungs()}
    stopped = {samples for samples in trace.ended if samples != unit}
    assert stopped and stopped <= rungs and trace.trials > 6
    assert 6 * unit <= trace.spent[-1] < 7 * unit and trace.told.get("PRUNED", 0) == len(
        [s for s in trace.ended if s != unit]
    )


def test_the_command_writes_the_summary(tmp_path):
    out = tmp_path / "summary.json"
    command = [sys.executable, str(REPO / "benchmarks" / "external.py"), "--task", "hpolib/naval", "--seeds", "3"]
    command += ["--trials", "12", "--processes", "1", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert set(summary) == {"task", "budgets", "strategies", "paired_vs_random"}
    assert summary["task"] == "hpolib/naval_propulsion" and summary["budgets"] == [10, 12]
    assert {"random", "optuna_tpe", "posetune"} <= set(summary["strategies"])
    assert set(summary["strategies"]["posetune"]["median_regret"]) == {"10", "12"}
    assert "random" not in summary["paired_vs_random"]
    for intervals in summary["paired_vs_random"].values():
        assert all(low <= high for low, high in intervals.values())
    assert list(tmp_path.iterdir()) == [out]  # a --task run writes only what it was asked to
    listed = subprocess.run([*command[:2], "--list"], capture_output=True, text=True, timeout=120)
    assert "mfh6/bad" in listed.stdout.split() and "nasbench201/cifar10" in listed.stdout.split()
