"""Search efficiency: posetune's search against random search on its own task, scored by what the user gets.

    python benchmarks/search_efficiency.py record [--configs 64 --seeds 3 --top 32]  # ~1.5 h on 2 cores
    python benchmarks/search_efficiency.py replay [--seeds 100 --tables 20]          # minutes
    python benchmarks/search_efficiency.py check                                     # two real searches, ~12 min

Real training at the scale of many searches does not fit on a laptop, so this records once
and replays many times (a tabular benchmark):

1. record: trains configurations of benchmarks/search_efficiency.yaml (a scrambled Sobol design
   from posetune's `qmc` sampler) to the full budget with posetune's own trial config and
   `fit`, one CPU thread each, and writes every evaluation (the search metric at each
   milestone and the wall seconds from the trial's start) to benchmarks/results/
   search_efficiency_recording.json: training seed 0 of every configuration, then seeds 1..
   of the best `--top` by seed 0's end value, where a search's decision is made. A diverged
   run is recorded up to where it diverged. Re-running continues an interrupted recording.
2. replay: runs each strategy with posetune's searcher and scheduler classes (those `posetune
   search` builds) on a simulated clock: `concurrency` trials at a time, each advancing by its
   recorded seconds per evaluation, until the search has spent its budget in training
   samples. A sampled configuration trains as the *nearest recorded* one (the same batch size
   and schedule, then the smallest distance in log learning rate and log beta_loss, each
   scaled to its range), as one of its recorded seeds drawn by the trial's seed: a repeated
   configuration is a new seed, not a new configuration.
   Score: the *regret* of the incumbent (the trial with the best evaluation, as posetune
   ranks trials) after each budget: its configuration's true value (the seed mean of each
   run's end value, the mean of its last 3 evaluations) minus the best configuration's. The
   figures: median regret at 2-32 full trials with paired intervals against random search;
   the budget each strategy needs to reach random search's regret at 16 full trials (x 16);
   the same ratio over bootstrap resamples of the configurations; the planted checks (PLANTED).
3. check: one real `posetune search` per strategy posetune (8 trials) and random (4 trials),
   each compared with the replays of the same search (trial count, 2 at a time).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import math
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the replay shared with external.py
import tune_replay
from regret import interval, paired, resamples, versus
from tune_replay import Curve, Trace

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SPACE_FILE = REPO / "benchmarks" / "search_efficiency.yaml"
RECORDING = RESULTS / "search_efficiency_recording.json"
PARTS = RESULTS / "search_efficiency_recording.parts"  # one file per run while recording
END_EVALUATIONS = 3  # a run's end value: the mean of its last 3 evaluations (3,072 samples)


# --- record -------------------------------------------------------------------------------------


def design(count: int) -> list[dict]:
    """`count` configurations of the benchmark's space from posetune's `qmc` sampler (scrambled
    Sobol): spread evenly, unlike random draws, so that the replay's lookups stay close."""
    from posetune.search.searchers import SAMPLERS
    from posetune.search.space import DefineByRun, load_space

    space, _ = load_space(SPACE_FILE)
    settings = space.search.model_copy(update={"searcher": "qmc", "seed": 0})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=SAMPLERS["qmc"](settings))
    sample = DefineByRun(space)
    configs = []
    for _ in range(count):
        trial = study.ask()
        sample(trial)
        configs.append(dict(trial.params))
        study.tell(trial, 0.0)
    return configs


def record_one(job: tuple[int, dict, int]) -> dict:
    """Train one configuration with one training seed to the full budget (in a worker
    process, one thread). The seed sets the initial weights and the order of the batches."""
    import torch

    from posetune.search.run import absolute_paths, ensure_dataset
    from posetune.search.space import load_space
    from posetune.search.trial import budget_config
    from posetune.train.loop import TrainingDiverged, fit

    index, params, seed = job
    torch.set_num_threads(1)
    space, base = load_space(SPACE_FILE)
    base = absolute_paths(base)
    cfg = budget_config(space, base, ensure_dataset(space, base), params)
    cfg.seed = seed
    cfg.dataset.num_workers = 0  # batches made in this process: one thread per configuration
    metric = space.search.metric
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"posetune-record-{os.getpid()}-{index}-{seed}"
    cfg.system.out_dir = str(out)
    curve: list[dict] = []
    start = time.perf_counter()

    def on_evaluation(evaluation) -> None:  # seconds: wall time from the start (training, evaluations, saves)
        seconds = round(time.perf_counter() - start, 2)
        curve.append({"samples": evaluation.samples_seen, metric: evaluation.metrics[metric], "seconds": seconds})

    diverged = None
    try:
        fit(cfg, on_evaluation=on_evaluation, progress=False)
    except TrainingDiverged as exc:
        diverged = exc.samples_seen
    finally:
        shutil.rmtree(out, ignore_errors=True)
    run = {"index": index, "seed": seed, "curve": curve, "diverged_at": diverged}
    (PARTS / f"{index:03d}-{seed}.json").write_text(json.dumps(run))
    return run


def end_value(run: dict, metric: str) -> float:
    """A run's de-noised end-of-training value: the mean of its last END_EVALUATIONS
    evaluations (one evaluation of 300 frames is noisy); a diverged run's is infinite."""
    points = run["curve"][-END_EVALUATIONS:]
    if run["diverged_at"] is not None or len(points) < END_EVALUATIONS:
        return math.inf
    return statistics.fmean(point[metric] for point in points)


def recorded_runs() -> dict[int, list[dict]]:
    """Every recorded run by configuration index: the recording's, then the parts of an
    interrupted recording. A recording from before seeds were recorded holds seed 0 only."""
    runs: dict[int, list[dict]] = {}
    if RECORDING.exists():
        for entry in json.loads(RECORDING.read_text())["configs"]:
            if "runs" not in entry:  # the format before seeds: one run, seed 0
                entry["runs"] = [{"seed": 0, "curve": entry["curve"], "diverged_at": entry["diverged_at"]}]
            runs[entry["index"]] = entry["runs"]
    parts = sorted(PARTS.glob("*.json")) if PARTS.exists() else []
    for part in parts:
        run = json.loads(part.read_text())
        runs.setdefault(run.pop("index"), []).append(run)
    return {index: sorted(rs, key=lambda r: r["seed"]) for index, rs in runs.items()}


def record_jobs(configs: list[dict], seeds: int, top: int, runs: dict[int, list[dict]], metric: str) -> list[tuple]:
    """What is left to train: seed 0 of every configuration, then seeds 1..seeds-1 of the
    `top` best by seed 0's end value (where the search's decision is made): every seed of the
    best 16 first, so that an interrupted recording is most complete where it matters most."""
    jobs = [(i, params, 0) for i, params in enumerate(configs) if i not in runs]
    if jobs:  # the ranking needs every seed 0 first
        return jobs
    ranked = sorted(runs, key=lambda i: end_value(runs[i][0], metric))[:top]
    have = {(i, run["seed"]) for i, rs in runs.items() for run in rs}
    jobs = [(rank // 16, seed, rank, i) for rank, i in enumerate(ranked) for seed in range(1, seeds)]
    return [(i, configs[i], seed) for _tier, seed, _rank, i in sorted(jobs) if (i, seed) not in have]


def record(count: int, seeds: int, top: int, processes: int) -> None:
    from posetune.data.loader import load_split
    from posetune.search.run import absolute_paths, ensure_dataset
    from posetune.search.space import load_space

    space, base = load_space(SPACE_FILE)
    base = absolute_paths(base)
    ensure_dataset(space, base)  # generated and cached once, before the workers start
    for split in (base.dataset.train_split, base.dataset.val_split):
        load_split(base, split)
    PARTS.mkdir(parents=True, exist_ok=True)
    configs, metric = design(count), space.search.metric
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    while jobs := record_jobs(configs, seeds, top, recorded_runs(), metric):
        print(f"recording {len(jobs)} runs in {processes} processes", file=sys.stderr)
        with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
            futures = [pool.submit(record_one, job) for job in jobs]
            for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                run = future.result()
                print(
                    f"[{done}/{len(jobs)}] config {run['index']} seed {run['seed']}: end {metric} "
                    f"{end_value(run, metric):.4g}"
                    + (f", diverged at {run['diverged_at']:,}" if run["diverged_at"] is not None else "")
                    + f"  ({time.perf_counter() - start:.0f} s)",
                    file=sys.stderr,
                )
    runs = recorded_runs()
    entries = [{"index": i, "params": configs[i], "runs": runs[i]} for i in sorted(runs) if i < count]
    RECORDING.write_text(
        json.dumps(
            {
                "how": (
                    f"benchmarks/search_efficiency.py record --configs {count} --seeds {seeds} --top {top}: "
                    f"{len(entries)} configurations of benchmarks/search_efficiency.yaml (posetune's qmc "
                    "sampler, seed 0), each trained to search.asha.max_samples with posetune.search.trial."
                    f"budget_config and posetune.train.loop.fit with training seed 0, the {top} best by "
                    f"their end value with seeds 1..{seeds - 1} too; one CPU thread each, {processes} at a time"
                ),
                "machine": f"{os.cpu_count()} CPUs, torch threads 1 per run",
                "versions": versions(),
                "space": SPACE_FILE.name,
                "metric": metric,
                "budget_samples": space.search.asha.max_samples,
                "configs": entries,
            },
            indent=1,
        )
    )
    shutil.rmtree(PARTS)  # the recording holds them all now
    print(f"wrote {RECORDING}", file=sys.stderr)


def versions() -> dict[str, str]:
    """The packages that decide a result, recorded in every results file."""
    from importlib.metadata import version

    return {p: version(p) for p in ("ray", "optuna", "torch", "numpy")}


# --- replay -------------------------------------------------------------------------------------

# name -> (search-file settings over benchmarks/search_efficiency.yaml's, the searcher instead of posetune's)
STRATEGIES: dict[str, tuple[list[str], str | None]] = {
    "posetune": ([], None),  # the file's search (quick.yaml's settings): TPE + ASHA with rung trust and 3 brackets
    "random": (["search.searcher=random", "search.scheduler=fifo"], None),  # a plain sweep
    "tpe": (["search.scheduler=fifo"], None),
    "random_asha": (["search.searcher=random"], None),
    "tpe_asha_complete": ([], "stock"),  # Ray's stock OptunaSearch: a stopped trial told COMPLETE
}
# Candidate changes to the default search, measured with --strategies (the README says which won).
CANDIDATES: dict[str, tuple[list[str], str | None]] = {
    # the default before rung trust and brackets: Ray's ASHA as it is
    "posetune_plain_asha": (["search.asha.rung_correlation=null", "search.asha.brackets=1"], None),
    "posetune_gated": (["search.asha.rung_correlation=0.5", "search.asha.brackets=1"], None),  # rung trust alone
    "posetune_gated7": (["search.asha.rung_correlation=0.7", "search.asha.brackets=1"], None),
    "posetune_brackets": (["search.asha.rung_correlation=null"], None),  # brackets alone
    "posetune_late_grace": (["search.asha.grace_samples=6144"], None),  # one rung, a third of the budget in
    "posetune_startup10": (["search.startup_trials=10"], None),  # Optuna's start-up count
    "posetune_smoothed": ([], None),  # each evaluation reported as the mean of the last 3 (not a setting yet)
}
# Planted checks: random search changed in a way whose answer is known. If one misses, the
# benchmark is broken, whatever the strategies do.
PLANTED = {
    "random_half_cost": "random search whose trials cost half the samples: needs 0.5x random's budget",
    "random_good_lr": "random search within the learning rates of the 8 best configurations: clearly ahead",
}
MARKS = (2, 4, 8, 16, 32)  # the budgets reported, in full trials
TARGET_TRIALS = 16  # the acceptance: reach random's regret at 16 full trials in half the budget
STEP = 0.25  # the regret curves' grid, in full trials


def strategy_settings(strategy: str, trials: int) -> list[str]:
    """The search-file settings of a strategy's search of `trials` trials."""
    settings, _ = (STRATEGIES | CANDIDATES)["random" if strategy in PLANTED else strategy]
    return [*settings, f"search.num_samples={trials}"]


class Recording:
    """The recorded runs, which one a sampled configuration trains as, and what it is worth.

    A configuration's *true value* is the mean over its recorded seeds of each run's end value
    (the mean of its last evaluations): what a user gets from training it, de-noised. A
    sampled configuration trains as the nearest recorded one, as one of its recorded seeds
    (drawn by the trial's seed), so a repeated configuration is a new seed of it."""

    def __init__(self, data: dict, space, configs: list[dict] | None = None):
        self.data, self.space = data, space
        self.configs = data["configs"] if configs is None else configs
        self.metric = data["metric"]
        self.parameters = space.parameters
        ends = [run["curve"][-1] for entry in self.configs for run in entry["runs"] if run["curve"]]
        self.seconds_per_sample = sum(end["seconds"] for end in ends) / sum(end["samples"] for end in ends)
        self.truth = {e["index"]: statistics.fmean(end_value(r, self.metric) for r in e["runs"]) for e in self.configs}
        self.optimum = min(self.truth.values())

    def resampled(self, rng: np.random.Generator) -> Recording:
        """The same task with its configurations drawn again with replacement: a bootstrap
        over configurations (a repeated one is one point of the space, counted once)."""
        picks = sorted(set(rng.integers(len(self.configs), size=len(self.configs)).tolist()))
        return Recording(self.data, self.space, [self.configs[i] for i in picks])

    def nearest(self, params: dict) -> dict:
        """The same choice values where possible, then the nearest continuous values, each
        distance scaled to its parameter's range (log ranges for log distributions)."""
        return min(self.configs, key=lambda entry: self._distance(params, entry["params"]))

    def __call__(self, params: dict, seed: int, cost: float = 1.0, smooth: int = 1) -> Curve:
        """What a sampled configuration reports: one recorded run of its nearest recorded
        configuration; a diverged run reports what a diverged trial reports to Tune
        (choices.diverged_result) where it diverged. `cost`: samples counted per sample seen;
        `smooth`: each evaluation reported as the mean of the last `smooth` (a candidate)."""
        from posetune.choices import diverged_result

        entry = self.nearest(params)
        run = entry["runs"][seed % len(entry["runs"])]
        points = [dict(point) for point in run["curve"]]
        values = [point[self.metric] for point in points]
        for k, point in enumerate(points):
            point[self.metric] = statistics.fmean(values[max(0, k + 1 - smooth) : k + 1])
        if run["diverged_at"] is not None:
            worst = diverged_result(self.metric, "diverged", run["diverged_at"])[self.metric]
            seconds = run["diverged_at"] * self.seconds_per_sample
            points.append({self.metric: worst, "diverged": 1, "samples": run["diverged_at"], "seconds": seconds})
        for point in points:
            point["samples"] = round(point["samples"] * cost)
        return Curve(points, config=entry["index"], score=self.truth[entry["index"]])

    def good_lr_band(self, count: int = 8) -> tuple[float, float]:
        """The learning rates the `count` best configurations span (the planted check's band)."""
        best = sorted(self.configs, key=lambda e: self.truth[e["index"]])[:count]
        rates = [entry["params"]["optimizer.lr"] for entry in best]
        return min(rates), max(rates)

    def _distance(self, a: dict, b: dict) -> float:
        total = 0.0
        for key, p in self.parameters.items():
            x, y = a.get(key), b.get(key)
            if p.distribution in ("choice", "fixed"):
                total += 0.0 if x == y else 100.0
            elif x is not None and y is not None:
                log = p.distribution == "loguniform" or p.log
                span = math.log(p.high / p.low) if log else p.high - p.low
                total += ((math.log(x / y) if log else x - y) / span) ** 2
        return total


def replay(
    recording: Recording, strategy: str, seed: int, budget: float, concurrency: int, trials: int | None = None
) -> Trace:
    """One search on a simulated clock, driven like Tune drives posetune's searcher and
    scheduler (tune_replay.replay). It ends when it has spent `budget` samples, or after
    `trials` trials (as search.num_samples does)."""
    from ray.tune.search.optuna import OptunaSearch

    from posetune.search.searchers import SAMPLERS
    from posetune.search.space import DefineByRun, load_space

    full_trials = trials or int(budget // recording_budget(recording))
    # num_samples: the sweep this budget buys, which sets TPE's start-up trials
    space, _ = load_space(SPACE_FILE, [*strategy_settings(strategy, full_trials), f"search.seed={seed}"])
    s = space.search
    searcher = None  # posetune's: build_searcher
    if (STRATEGIES | CANDIDATES).get(strategy, ([], None))[1] == "stock":
        searcher = OptunaSearch(
            space=DefineByRun(space), metric=s.metric, mode=s.resolved_mode, sampler=SAMPLERS["tpe"](s)
        )
    curves: tune_replay.Recording = recording
    if strategy == "random_half_cost":
        curves = functools.partial(recording, cost=0.5)
    elif strategy == "posetune_smoothed":
        curves = functools.partial(recording, smooth=END_EVALUATIONS)
    elif strategy == "random_good_lr":
        low, high = recording.good_lr_band()
        lr = space.parameters["optimizer.lr"].model_copy(update={"low": low, "high": high})
        space = space.model_copy(update={"parameters": space.parameters | {"optimizer.lr": lr}})
    return tune_replay.replay(space, curves, seed, budget, concurrency, trials, searcher)


def recording_budget(recording: Recording) -> int:
    return max(point["samples"] for entry in recording.configs for run in entry["runs"] for point in run["curve"])


def grid(full_trials: int) -> np.ndarray:
    """The budgets (in full trials) the regret curves are read at."""
    return np.arange(STEP, full_trials + STEP / 2, STEP)


def regret_curves(
    recording: Recording, strategies: list[str], seeds: int, full_trials: int, concurrency: int, processes: int = 1
) -> dict[str, np.ndarray]:
    """strategy -> (seeds, grid) regret of the incumbent (the trial with the best evaluation,
    as posetune ranks trials): its configuration's true value minus the best true value."""
    jobs = [(name, seed, full_trials, concurrency) for name in strategies for seed in range(seeds)]
    if processes > 1:
        with concurrent.futures.ProcessPoolExecutor(processes, initializer=_use, initargs=(recording,)) as pool:
            rows = list(pool.map(_regret_row, jobs, chunksize=8))
    else:
        _use(recording)
        rows = [_regret_row(job) for job in jobs]
    return {name: np.array(rows[i * seeds : (i + 1) * seeds]) for i, name in enumerate(strategies)}


_RECORDING: Recording | None = None  # the recording a worker process replays over (set once per process)


def _use(recording: Recording) -> None:
    global _RECORDING
    _RECORDING = recording


def _regret_row(job: tuple[str, int, int, int]) -> list[float]:
    name, seed, full_trials, concurrency = job
    unit = recording_budget(_RECORDING)
    trace = replay(_RECORDING, name, seed, full_trials * unit, concurrency)
    return [trace.score_at(b * unit) - _RECORDING.optimum for b in grid(full_trials)]


def budget_to_reach(curve: np.ndarray, target: float, budgets: np.ndarray, statistic=np.median) -> float:
    """The first budget at which the statistic over seeds is at or below `target` (inf: never)."""
    reached = np.nonzero(statistic(curve, axis=0) <= target)[0]
    return float(budgets[reached[0]]) if len(reached) else math.inf


def budget_ratios(curves: dict[str, np.ndarray], budgets: np.ndarray) -> dict[str, dict]:
    """Each strategy's budget to reach random search's median regret at TARGET_TRIALS full
    trials, as a fraction of TARGET_TRIALS, with its 95% interval (seeds resampled together);
    the same for the mean regret (`mean_ratio`), which has no plateaus: a median over a few
    dozen distinct regrets stays flat for a while, so random reaches its own value at 16
    early as well."""
    column = int(np.searchsorted(budgets, TARGET_TRIALS))
    idx = resamples(len(curves["random"]))
    figures: dict[str, dict] = {name: {} for name in curves}
    targets = {}
    for key, statistic in (("ratio", np.median), ("mean_ratio", np.mean)):
        targets[key] = float(statistic(curves["random"][:, column]))
        random_at = [float(statistic(curves["random"][i, column])) for i in idx]  # per resample
        for name, curve in curves.items():
            boot = [budget_to_reach(curve[i], t, budgets, statistic) for i, t in zip(idx, random_at, strict=True)]
            figures[name][key] = budget_to_reach(curve, targets[key], budgets, statistic) / TARGET_TRIALS
            bounds = np.percentile(boot, [2.5, 97.5], method="nearest") / TARGET_TRIALS  # inf: not reached
            figures[name][f"{key}_interval"] = bounds.tolist()
    return {"target_regret": targets["ratio"], "target_mean_regret": targets["mean_ratio"], "strategies": figures}


def over_configurations(recording: Recording, strategies: list[str], tables: int, seeds: int, args) -> dict:
    """Each strategy against random search again on `tables` bootstrap resamples of the
    configurations: its mean regret minus random's at each reported budget, per resample (how
    much the result depends on which 64 configurations happened to be recorded)."""
    rng = np.random.default_rng(1)
    budgets = grid(args.trials)
    marks = [m for m in MARKS if m <= args.trials]
    columns = [int(np.searchsorted(budgets, m)) for m in marks]
    differences: dict[str, list[np.ndarray]] = {name: [] for name in strategies if name != "random"}
    for _ in range(tables):
        curves = regret_curves(
            recording.resampled(rng), strategies, seeds, args.trials, args.concurrency, args.processes
        )
        for name in differences:
            differences[name].append(curves[name][:, columns].mean(axis=0) - curves["random"][:, columns].mean(axis=0))
    summary = {}
    for name, rows in differences.items():
        rows = np.array(rows)  # (tables, marks)
        summary[name] = {
            str(m): {
                "median": float(np.median(rows[:, k])),
                "range": np.percentile(rows[:, k], [2.5, 97.5]).tolist(),
                "share_ahead": float(np.mean(rows[:, k] < 0)),
            }
            for k, m in enumerate(marks)
        }
    return {"tables": tables, "seeds": seeds, "mean_regret_minus_random": summary}


PLANTED_AT = 4  # full trials: where the good band must be ahead (by 16 random may find the best too)


def planted_checks(curves: dict[str, np.ndarray], budgets: np.ndarray, ratios: dict[str, dict]) -> dict[str, dict]:
    """Whether each planted effect shows: half cost needs 0.4-0.6x of the budget random needs
    to reach random's median regret at TARGET_TRIALS (random's own budget, not TARGET_TRIALS:
    its median curve may reach that value early and stay flat); the good band's mean regret at
    PLANTED_AT full trials is below random's, its paired 95% interval below 0 (means: medians
    of a few dozen distinct regrets are often equal). `ratios`: budget_ratios(...)["strategies"]."""
    half = ratios["random_half_cost"]["ratio"] / ratios["random"]["ratio"]
    column = [int(np.searchsorted(budgets, PLANTED_AT))]
    good = paired(curves["random_good_lr"][:, column], curves["random"][:, column], np.mean)[0]
    return {
        "random_half_cost": {"budget_over_randoms": half, "ok": 0.4 <= half <= 0.6},
        "random_good_lr": {f"mean_regret_minus_random_at_{PLANTED_AT}": good, "ok": good[1] < 0},
    }


def replay_all(args: argparse.Namespace) -> None:
    from posetune.search.space import load_space

    space, _ = load_space(SPACE_FILE)
    recording = Recording(json.loads(RECORDING.read_text()), space)
    strategies = ["random", *[s for s in args.strategies if s != "random"]]
    start = time.perf_counter()
    curves = regret_curves(recording, strategies, args.seeds, args.trials, args.concurrency, args.processes)
    print(f"{len(strategies)} strategies x {args.seeds} seeds in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    budgets = grid(args.trials)
    marks = [m for m in MARKS if m <= args.trials]
    columns = [int(np.searchsorted(budgets, m)) for m in marks]
    ratios = budget_ratios(curves, budgets)
    paired_vs_random = versus(curves, "random", columns, [str(m) for m in marks])
    figures = {
        "how": (
            f"benchmarks/search_efficiency.py replay --seeds {args.seeds} --trials {args.trials} "
            f"--concurrency {args.concurrency} --tables {args.tables} over {RECORDING.name}"
        ),
        "versions": versions(),
        "recording_versions": recording.data.get("versions"),
        "seeds": args.seeds,
        "concurrency": args.concurrency,
        "budget_unit_samples": recording_budget(recording),
        "configs_recorded": len(recording.configs),
        "runs_recorded": sum(len(e["runs"]) for e in recording.configs),
        "optimum": recording.optimum,
        "budgets": marks,
        "strategies": {
            name: {
                "median_regret": {str(m): float(np.median(c[:, k])) for m, k in zip(marks, columns, strict=True)},
                "median_interval": {
                    str(m): [lo, hi]
                    for m, lo, hi in zip(marks, *(np.array(interval(c, np.median))[:, columns]), strict=True)
                },
            }
            for name, c in curves.items()
        },
        "paired_vs_random": paired_vs_random,
        "budget_to_random_at_16": ratios,
        "planted": planted_checks(curves, budgets, ratios["strategies"]) if set(PLANTED) <= set(curves) else {},
        "diagnostics": diagnostics(recording, [int(rung) for rung in space.search.asha.rungs()]),
    }
    if args.tables:
        figures["over_configurations"] = over_configurations(recording, strategies, args.tables, args.table_seeds, args)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search_efficiency.json").write_text(json.dumps(figures, indent=2))
    plot(curves, budgets, out / "search_efficiency.png")
    (out / "search_efficiency.md").write_text(markdown(figures))
    print(markdown(figures))
    if not figures["planted"]:
        print("planted checks not run: --strategies left them out", file=sys.stderr)
    elif not all(check["ok"] for check in figures["planted"].values()):
        raise SystemExit("a planted check failed: the benchmark cannot tell strategies apart (see above)")


def plot(curves: dict[str, np.ndarray], budgets: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, c in curves.items():
        low, high = np.array(interval(c, np.median))
        line = ax.plot(budgets, np.median(c, axis=0), label=name, linestyle=":" if name in PLANTED else "-")[0]
        ax.fill_between(budgets, low, high, color=line.get_color(), alpha=0.12)
    ax.axvline(TARGET_TRIALS, color="grey", linestyle=":")
    ax.set_xlabel("budget spent (full trials)")
    ax.set_ylabel("regret of the incumbent (median, 95% interval over seeds)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=0.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def diagnostics(recording: Recording, rungs: list[int]) -> dict:
    """What the recorded task looks like to a search: how well a run's value at each ASHA rung
    ranks the configurations' true values (Spearman, over all and over the better half), how
    noisy one evaluation is, and how much the seeds of one configuration differ."""
    from scipy.stats import spearmanr

    metric, entries = recording.metric, recording.configs
    truth = [recording.truth[e["index"]] for e in entries]
    good = [i for i, t in enumerate(truth) if t <= statistics.median(truth)]

    def at(entry: dict, samples: int) -> float:
        return next((p[metric] for p in entry["runs"][0]["curve"] if p["samples"] == samples), math.inf)

    correlation = {}
    for rung in rungs:
        values = [at(e, rung) for e in entries]
        correlation[str(rung)] = {
            "all": round(float(spearmanr(values, truth).statistic), 3),
            "better_half": round(float(spearmanr([values[i] for i in good], [truth[i] for i in good]).statistic), 3),
        }
    runs = [r for i in good for r in entries[i]["runs"]]
    noise = statistics.median(statistics.stdev(p[metric] for p in r["curve"][-6:]) for r in runs)
    seeded = [e for e in entries if len(e["runs"]) > 1]
    spread = [statistics.stdev(end_value(r, metric) for r in e["runs"]) for e in seeded]
    return {
        "rung_rank_correlation_with_truth": correlation,
        "evaluation_noise": round(noise, 3),  # median sd of the last 6 evaluations, better half
        "seed_sd_of_end_value": round(statistics.median(spread), 3) if spread else None,
        "best_true_values": [round(t, 3) for t in sorted(truth)[:8]],
    }


def markdown(figures: dict) -> str:
    marks = figures["budgets"]
    lines = [
        f"Regret of the incumbent (its configuration's true value, the seed mean of the end value, minus "
        f"the best recorded configuration's, {figures['optimum']:.3f}) after each budget in full trials, "
        f"median over {figures['seeds']} seeds; in brackets the paired 95% interval of median(strategy) - "
        f"median(random) (negative: ahead). {figures['concurrency']} trials at a time, "
        f"{figures['configs_recorded']} configurations, {figures['runs_recorded']} recorded runs.",
        "",
        "| strategy | "
        + " | ".join(map(str, marks))
        + " | budget to random's median regret at 16 (x 16) | same, mean regret |",
        "| --- |" + " ---: |" * (len(marks) + 2),
    ]
    ratios = figures["budget_to_random_at_16"]["strategies"]
    for name, f in figures["strategies"].items():
        cells = []
        for m in marks:
            cell = f"{f['median_regret'][str(m)]:.3f}"
            if name != "random":
                low, high = figures["paired_vs_random"][name][str(m)]
                cell += f" [{low:+.3f}, {high:+.3f}]"
            cells.append(cell)
        r = ratios[name]
        for key in ("ratio", "mean_ratio"):
            low, high = r[f"{key}_interval"]
            cells.append(f"{r[key]:.2f} [{low:.2f}, {high:.2f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "over_configurations" in figures:
        o = figures["over_configurations"]
        lines += [
            "",
            f"Over {o['tables']} bootstrap resamples of the configurations ({o['seeds']} seeds each): mean "
            "regret minus random's, its median over the resamples, 95% range, and the share of resamples "
            "in which the strategy is ahead:",
            "",
            "| strategy | " + " | ".join(map(str, marks)) + " |",
            "| --- |" + " ---: |" * len(marks),
        ]
        for name, by_mark in o["mean_regret_minus_random"].items():
            cells = [
                f"{c['median']:+.3f} [{c['range'][0]:+.2f}, {c['range'][1]:+.2f}] {c['share_ahead']:.0%}"
                for c in by_mark.values()
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Planted checks (if one fails the benchmark is broken):", ""] if figures["planted"] else []
    for name, check in figures["planted"].items():
        shown = {k: v for k, v in check.items() if k != "ok"}
        lines.append(f"- {name} ({PLANTED[name]}): {'passes' if check['ok'] else 'FAILS'} {shown}")
    d = figures["diagnostics"]
    lines += [
        "",
        f"The task: rung-to-truth Spearman {d['rung_rank_correlation_with_truth']}; one evaluation's noise "
        f"(sd) {d['evaluation_noise']}, seeds' sd of the end value {d['seed_sd_of_end_value']}; "
        f"versions {figures['versions']}.",
    ]
    return "\n".join(lines) + "\n"


# --- check ------------------------------------------------------------------------------------

CHECKS = {"posetune": 8, "random": 4}  # strategy -> trials of its real search: a few, on 2 cores


def _same_params(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        math.isclose(a[k], b[k], rel_tol=1e-9) if isinstance(a[k], float) else a[k] == b[k] for k in a
    )


def check(seeds: int) -> None:
    """One real `posetune search` per strategy, then the replay of the same search (same trial
    count, 2 at a time) over the seeds: where the real run falls in the replay's spread."""
    from posetune.search.space import load_space

    space, _ = load_space(SPACE_FILE)
    recording = Recording(json.loads(RECORDING.read_text()), space)
    figures = {}
    for strategy, trials in CHECKS.items():
        settings = strategy_settings(strategy, trials)
        with tempfile.TemporaryDirectory(prefix="posetune-check-") as folder:
            argv = [sys.executable, "-m", "posetune", "search", str(SPACE_FILE), *settings]
            argv += [f"storage.path={folder}", f"storage.name=check-{strategy}", "tracking.enabled=false"]
            print("running", " ".join(argv[2:]), file=sys.stderr)
            start = time.perf_counter()
            subprocess.run(argv, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - start
            results = json.loads((Path(folder) / f"check-{strategy}" / "results.json").read_text())["trials"]
        metric = recording.metric
        spent = sum(trial["samples_seen"] for trial in results)
        # A real trial that drew a recorded configuration exactly (the samplers' first draws
        # coincide with the design's first point) shows whether the recording is what a real
        # search trains: the same seed and one thread each, so the same curve.
        same = [
            {
                "samples": trial["samples_seen"],
                "real_best": trial["best_metrics"][metric],
                "recorded_best": min(
                    p[metric] for p in entry["runs"][0]["curve"] if p["samples"] <= trial["samples_seen"]
                ),
            }
            for trial in results
            for entry in recording.configs
            if trial.get("best_metrics")
            and entry["runs"][0]["curve"]
            and _same_params(trial["params"], entry["params"])
        ]
        trials_run = [
            {key: trial.get(key) for key in ("id", "params", "status", "samples_seen")}
            | {"best": trial.get("best_metrics", {}).get(metric)}
            for trial in results
        ]
        best = min(trial["best_metrics"][metric] for trial in results if trial.get("best_metrics"))
        replays = [replay(recording, strategy, seed, math.inf, 2, trials) for seed in range(seeds)]
        bests = sorted(trace.best[-1] for trace in replays)
        figures[strategy] = {
            "settings": settings,
            "real": {"best": best, "samples_spent": spent, "wall_seconds": round(wall), "trials": trials_run},
            "replay": {
                "best_quartiles": [float(q) for q in np.percentile(bests, [25, 50, 75])],
                "best_range": [bests[0], bests[-1]],
                "samples_spent_median": statistics.median(trace.spent[-1] for trace in replays),
                "seeds": seeds,
            },
            "real_best_rank_among_replays": sum(b < best for b in bests) / len(bests),
            "real_trials_of_recorded_configs": same,
        }
        print(json.dumps({strategy: figures[strategy]}, indent=1), file=sys.stderr)
    (RESULTS / "search_efficiency_check.json").write_text(json.dumps(figures, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record", help="train configurations to the full budget and record their curves")
    rec.add_argument("--configs", type=int, default=64)
    rec.add_argument("--seeds", type=int, default=3, help="training seeds of each of the --top configurations")
    rec.add_argument("--top", type=int, default=32, help="how many of the best configurations get every seed")
    rec.add_argument("--processes", type=int, default=2)
    rep = commands.add_parser("replay", help="replay the strategies over the recording")
    rep.add_argument("--seeds", type=int, default=100)
    rep.add_argument("--trials", type=int, default=32, help="the largest budget, in full trials (of max_samples)")
    rep.add_argument("--concurrency", type=int, default=4)
    rep.add_argument("--tables", type=int, default=20, help="bootstrap resamples of the configurations (0: none)")
    rep.add_argument("--table-seeds", type=int, default=20, help="seeds per resample")
    every = [*STRATEGIES, *PLANTED, *CANDIDATES]
    rep.add_argument(
        "--strategies",
        type=lambda text: text.split(","),
        default=every,
        help=f"comma-separated, of: {', '.join(every)} (default: all)",
    )
    rep.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    rep.add_argument("--results", default=str(RESULTS), help="folder for the figures (default: benchmarks/results)")
    chk = commands.add_parser("check", help="one real search for posetune and random, against their replays")
    chk.add_argument("--seeds", type=int, default=200)
    args = parser.parse_args()
    if args.command == "replay" and set(args.strategies) - set(every):
        parser.error(f"unknown strategies {', '.join(sorted(set(args.strategies) - set(every)))}")
    if args.command == "check":
        check(args.seeds)
    elif args.command == "record":
        record(args.configs, args.seeds, args.top, args.processes)
    elif args.command == "replay":
        replay_all(args)


if __name__ == "__main__":
    main()
