"""Search efficiency: posetune's search against random search, at the same budget in samples.

    python benchmarks/search_efficiency.py record [--configs 64] [--processes 2]   # ~1 h on 2 cores
    python benchmarks/search_efficiency.py replay [--seeds 200]                    # ~1 min
    python benchmarks/search_efficiency.py check                                   # two real searches, ~12 min

Real training at the scale of many searches does not fit on a laptop, so this records once
and replays many times (a tabular benchmark):

1. record: trains configurations of benchmarks/search_efficiency.yaml (a scrambled Sobol design
   from posetune's `qmc` sampler) to the full budget with posetune's own trial config and
   `fit`, one CPU thread each, and writes every evaluation (the search metric at each
   milestone and the wall seconds from the trial's start) to benchmarks/results/
   search_efficiency_recording.json. A diverged configuration is recorded up to where it
   diverged. Re-running continues an interrupted recording.
2. replay: runs each strategy with posetune's searcher and scheduler classes (those `posetune
   search` builds) on a simulated clock: `concurrency` trials at a time, each advancing by its
   recorded seconds per evaluation, until the search has spent its budget in
   training samples. A sampled configuration trains as the *nearest recorded* one: the same
   batch size and schedule, then the smallest distance in log learning rate and log
   beta_loss, each scaled to its range.
3. check: one real `posetune search` per strategy posetune (8 trials) and random (4 trials),
   each compared with the replays of the same search (trial count, 2 at a time).

Strategies (same budget, same concurrency): posetune (TPE + ASHA, stopped trials told to
Optuna as pruned), random (no early stopping: a plain sweep), tpe (no early stopping),
random_asha, tpe_asha_complete (TPE + ASHA with stopped trials told as complete with their
partial score, as Ray's stock OptunaSearch does).
"""

from __future__ import annotations

import argparse
import concurrent.futures
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
from tune_replay import Curve, Trace

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SPACE_FILE = REPO / "benchmarks" / "search_efficiency.yaml"
RECORDING = RESULTS / "search_efficiency_recording.json"
PARTS = RESULTS / "search_efficiency_recording.parts"  # one file per configuration while recording


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


def record_one(job: tuple[int, dict]) -> dict:
    """Train one configuration to the full budget (in a worker process, one thread)."""
    import torch

    from posetune.search.run import absolute_paths, ensure_dataset
    from posetune.search.space import load_space
    from posetune.search.trial import budget_config
    from posetune.train.loop import TrainingDiverged, fit

    index, params = job
    torch.set_num_threads(1)
    space, base = load_space(SPACE_FILE)
    base = absolute_paths(base)
    cfg = budget_config(space, base, ensure_dataset(space, base), params)
    cfg.dataset.num_workers = 0  # batches made in this process: one thread per configuration
    metric = space.search.metric
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"posetune-record-{os.getpid()}-{index}"
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
    entry = {"index": index, "params": params, "curve": curve, "diverged_at": diverged}
    part = PARTS / f"{index:03d}.json"
    part.write_text(json.dumps(entry))
    return entry


def record(count: int, processes: int) -> None:
    from posetune.data.loader import load_split
    from posetune.search.run import absolute_paths, ensure_dataset
    from posetune.search.space import load_space

    space, base = load_space(SPACE_FILE)
    base = absolute_paths(base)
    ensure_dataset(space, base)  # generated and cached once, before the workers start
    for split in (base.dataset.train_split, base.dataset.val_split):
        load_split(base, split)
    PARTS.mkdir(parents=True, exist_ok=True)
    jobs = [(i, params) for i, params in enumerate(design(count)) if not (PARTS / f"{i:03d}.json").exists()]
    print(f"recording {len(jobs)} of {count} configurations in {processes} processes", file=sys.stderr)
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        futures = [pool.submit(record_one, job) for job in jobs]
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            entry = future.result()
            best = min((p[space.search.metric] for p in entry["curve"]), default=float("nan"))
            print(
                f"[{done}/{len(jobs)}] config {entry['index']}: best {space.search.metric} {best:.4g}"
                + (f", diverged at {entry['diverged_at']:,}" if entry["diverged_at"] is not None else "")
                + f"  ({time.perf_counter() - start:.0f} s)",
                file=sys.stderr,
            )
    entries = [json.loads(p.read_text()) for p in sorted(PARTS.glob("*.json"))]
    RECORDING.write_text(
        json.dumps(
            {
                "how": (
                    f"benchmarks/search_efficiency.py record: {len(entries)} configurations of "
                    "benchmarks/search_efficiency.yaml (posetune's qmc sampler, seed 0), each trained "
                    "to search.asha.max_samples with posetune.search.trial.budget_config and posetune.train.loop.fit, "
                    f"one CPU thread each, {processes} at a time"
                ),
                "machine": f"{os.cpu_count()} CPUs, torch threads 1 per configuration",
                "space": SPACE_FILE.name,
                "metric": space.search.metric,
                "budget_samples": space.search.asha.max_samples,
                "configs": entries,
            },
            indent=1,
        )
    )
    shutil.rmtree(PARTS)  # the recording holds them all now
    print(f"wrote {RECORDING}", file=sys.stderr)


# --- replay -------------------------------------------------------------------------------------

STRATEGIES = {  # name -> (searcher, scheduler, how a stopped trial is told to Optuna)
    "posetune": ("tpe", "asha", "pruned"),
    "random": ("random", "fifo", "pruned"),
    "tpe": ("tpe", "fifo", "pruned"),
    "random_asha": ("random", "asha", "pruned"),
    "tpe_asha_complete": ("tpe", "asha", "complete"),
}


def strategy_settings(strategy: str, trials: int) -> list[str]:
    """The search-file settings of a strategy's search of `trials` trials."""
    searcher, scheduler, _ = STRATEGIES[strategy]
    return [f"search.searcher={searcher}", f"search.scheduler={scheduler}", f"search.num_samples={trials}"]


class Recording:
    """The recorded curves, and which one a sampled configuration trains as."""

    def __init__(self, data: dict, space):
        self.configs = data["configs"]
        self.metric = data["metric"]
        self.parameters = space.parameters
        ends = [entry["curve"][-1] for entry in self.configs if entry["curve"]]
        self.seconds_per_sample = sum(end["seconds"] for end in ends) / sum(end["samples"] for end in ends)

    def nearest(self, params: dict) -> dict:
        """The same choice values where possible, then the nearest continuous values, each
        distance scaled to its parameter's range (log ranges for log distributions)."""
        return min(self.configs, key=lambda entry: self._distance(params, entry["params"]))

    def curve(self, params: dict, seed: int) -> Curve:
        """What a sampled configuration reports: its nearest recorded one's curve (one training
        seed was recorded, so `seed` is unused); a diverged one reports what a diverged trial
        reports to Tune (choices.diverged_result) where it diverged."""
        from posetune.choices import diverged_result

        entry = self.nearest(params)
        points = [dict(point) for point in entry["curve"]]
        if entry["diverged_at"] is not None:
            worst = diverged_result(self.metric, "diverged", entry["diverged_at"])[self.metric]
            seconds = entry["diverged_at"] * self.seconds_per_sample
            points.append({self.metric: worst, "diverged": 1, "samples": entry["diverged_at"], "seconds": seconds})
        return Curve(points, config=entry["index"])

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

    told = STRATEGIES[strategy][2]
    full_trials = trials or int(budget // recording_budget(recording))
    # num_samples: the sweep this budget buys, which sets TPE's start-up trials
    space, _ = load_space(SPACE_FILE, [*strategy_settings(strategy, full_trials), f"search.seed={seed}"])
    s = space.search
    searcher = None  # posetune's: build_searcher
    if told == "complete":  # Ray's stock OptunaSearch: a stopped trial is told COMPLETE with its last score
        searcher = OptunaSearch(
            space=DefineByRun(space), metric=s.metric, mode=s.resolved_mode, sampler=SAMPLERS["tpe"](s)
        )
    return tune_replay.replay(space, recording.curve, seed, budget, concurrency, trials, searcher)


def recording_budget(recording: Recording) -> int:
    return max(point["samples"] for entry in recording.configs for point in entry["curve"])


def summarise(traces: dict[str, list[Trace]], budget: int) -> dict:
    """Each strategy's median budget to reach random search's median final best, its ratio
    to random search's, and its median final best. The target is the upper median of random
    search's final bests, so that more than half of random's searches reach it (with an even
    number of seeds the plain median would leave random's own median budget infinite)."""
    target = statistics.median_high(trace.best_at(budget) for trace in traces["random"])
    figures = {}
    for name, runs in traces.items():
        needed = statistics.median(trace.budget_to_reach(target) for trace in runs)
        figures[name] = {
            "median_budget_to_target": None if math.isinf(needed) else needed,
            "median_final_best": statistics.median(trace.best_at(budget) for trace in runs),
            "median_best_at_quarter_budget": statistics.median(trace.best_at(budget / 4) for trace in runs),
            "median_trials": statistics.median(trace.trials for trace in runs),
            "median_distinct_configs": statistics.median(len(trace.configs) for trace in runs),
        }
    random_needed = figures["random"]["median_budget_to_target"]
    for figure in figures.values():
        needed = figure["median_budget_to_target"]
        figure["ratio_to_random"] = None if needed is None else round(needed / random_needed, 3)
    return {"target": target, "strategies": figures}


def plot(traces: dict[str, list[Trace]], budget: int, unit: int, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(unit / 8, budget, 200)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, runs in traces.items():
        values = np.array([[trace.best_at(b) for b in grid] for trace in runs])
        q1, median, q3 = np.percentile(values, [25, 50, 75], axis=0)
        line = ax.plot(grid / unit, median, label=name)[0]
        ax.fill_between(grid / unit, q1, q3, color=line.get_color(), alpha=0.15)
    ax.axhline(target, color="grey", linestyle=":", label="random's median final best")
    ax.set_xlabel(f"budget spent (full trials of {unit:,} samples)")
    ax.set_ylabel("best pose_error so far (median, quartiles over seeds)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def replay_all(seeds: int, full_trials: int, concurrency: int) -> None:
    from posetune.search.space import load_space

    space, _ = load_space(SPACE_FILE)
    recording = Recording(json.loads(RECORDING.read_text()), space)
    unit = recording_budget(recording)
    budget = full_trials * unit
    traces: dict[str, list[Trace]] = {}
    for name in STRATEGIES:
        start = time.perf_counter()
        traces[name] = [replay(recording, name, seed, budget, concurrency) for seed in range(seeds)]
        print(f"{name}: {seeds} searches replayed in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    summary = summarise(traces, budget)
    asha = space.search.asha
    figures = {
        "seeds": seeds,
        "configs_recorded": len(recording.configs),
        "budget_unit": "samples",
        "budget": budget,
        "concurrency": concurrency,
        "target": summary["target"],
        "strategies": summary["strategies"],
        "recording": diagnostics(recording, [int(rung) for rung in asha.rungs()]),
        "how": (
            f"benchmarks/search_efficiency.py replay --seeds {seeds} --trials {full_trials} "
            f"--concurrency {concurrency} over {RECORDING.name}"
        ),
    }
    (RESULTS / "search_efficiency.json").write_text(json.dumps(figures, indent=2))
    plot(traces, budget, unit, summary["target"], RESULTS / "search_efficiency.png")
    (RESULTS / "search_efficiency.md").write_text(markdown(figures, unit))
    print(markdown(figures, unit))


def diagnostics(recording: Recording, rungs: list[int]) -> dict:
    """What the recorded task looks like to a search: how well a configuration's score at each
    ASHA rung ranks its best score (Spearman), and how noisy one evaluation is."""
    from scipy.stats import spearmanr

    metric, entries = recording.metric, [e for e in recording.configs if e["curve"]]
    best = [min(point[metric] for point in e["curve"]) for e in entries]
    correlation = {}
    for rung in rungs:
        at_rung = [next((p[metric] for p in e["curve"] if p["samples"] == rung), math.inf) for e in entries]
        correlation[str(rung)] = round(float(spearmanr(at_rung, best).statistic), 3)
    good = [e for e, b in zip(entries, best, strict=True) if b <= statistics.median(best)]
    noise = statistics.median(statistics.stdev(p[metric] for p in e["curve"][-6:]) for e in good)
    return {
        "rung_rank_correlation_with_best": correlation,
        "evaluation_noise": round(noise, 3),  # median sd of the last 6 evaluations, better half of configs
        "best_scores": [round(b, 3) for b in sorted(best)[:8]],  # the 8 best configurations' best scores
    }


def markdown(figures: dict, unit: int) -> str:
    lines = [
        f"Budget {figures['budget']:,} samples ({figures['budget'] // unit} full trials), "
        f"{figures['concurrency']} trials at a time, {figures['seeds']} seeds, "
        f"{figures['configs_recorded']} recorded configurations. Target: random search's median final "
        f"best pose_error, {figures['target']:.3f}.",
        "",
        "| strategy | median budget to target (samples) | ratio to random | median final best "
        "| median best at 1/4 budget | median trials (distinct configs) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, f in figures["strategies"].items():
        needed = "not reached" if f["median_budget_to_target"] is None else f"{f['median_budget_to_target']:,.0f}"
        ratio = "-" if f["ratio_to_random"] is None else f"{f['ratio_to_random']:.2f}"
        trials = f"{f['median_trials']:.0f} ({f['median_distinct_configs']:.0f})"
        lines.append(
            f"| {name} | {needed} | {ratio} | {f['median_final_best']:.3f} | "
            f"{f['median_best_at_quarter_budget']:.3f} | {trials} |"
        )
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
                "recorded_best": min(p[metric] for p in entry["curve"] if p["samples"] <= trial["samples_seen"]),
            }
            for trial in results
            for entry in recording.configs
            if trial.get("best_metrics") and entry["curve"] and _same_params(trial["params"], entry["params"])
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
    rec.add_argument("--processes", type=int, default=2)
    rep = commands.add_parser("replay", help="replay the strategies over the recording")
    rep.add_argument("--seeds", type=int, default=200)
    rep.add_argument("--trials", type=int, default=16, help="budget, in full trials (of max_samples each)")
    rep.add_argument("--concurrency", type=int, default=4)
    chk = commands.add_parser("check", help="one real search for posetune and random, against their replays")
    chk.add_argument("--seeds", type=int, default=200)
    args = parser.parse_args()
    if args.command == "check":
        check(args.seeds)
    elif args.command == "record":
        record(args.configs, args.processes)
    elif args.command == "replay":
        replay_all(args.seeds, args.trials, args.concurrency)


if __name__ == "__main__":
    main()
