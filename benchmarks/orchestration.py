"""Orchestration overhead: the same training once as `posetune train` and once as a one-trial search.

    python benchmarks/orchestration.py [--frames 2000] [--epochs 5] [--rounds 3] [--before REV]

Both runs are the CLI in a fresh process, untracked, on configs/quick.yaml, the same synthetic
frames, the same image cache (built before timing) and 2 CPU threads: `posetune train` uses
torch's default (one per core), the trial's Ray Train worker is given 2 CPUs (Ray sets its
thread count from that). Rounds alternate the two so drift on a shared host hits both alike.
Figures: each run's training throughput (mean over epochs 2..N, the `train_images_per_s` that
fit() records), their ratio, the plain run's again beside an idle local Ray instance (what Ray's
own processes cost it), each run's wall time and the difference, which is the search's
start-up overhead (Ray, Tune, the Train worker group, checkpoint reports).
The search's wall time is broken down into start-up, training, evaluations and worker set-up,
reports and shut-down (from the times its worker reported), and its processes' CPU seconds into
the Train worker, posetune's command and Ray's/Tune's other processes (sampled with psutil).
Writes benchmarks/results/orchestration.{json,md}.

With ``--before REV`` each round also runs the same one-trial search with posetune as of git
revision REV (its package extracted with `git archive`, first on the path), before or after
the current code's (alternating): a change's effect on each phase, before and after in one run.
Writes benchmarks/results/orchestration_before_REV.{json,md} instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from posetune.config import load_config
from posetune.data.loader import load_split
from posetune.data.synth import generate

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]


class CpuSampler:
    """CPU seconds used by each process of a run and its children, read every 0.5 s (the
    last reading of a process counts: it exits with the run). Grouped: the Ray Train worker
    (the training), posetune's own command, and the rest (Ray's raylet, GCS, dashboard, log
    monitor, the Tune trial driver and Train's controller)."""

    def __init__(self, root: int):
        import threading

        self.root, self.seconds, self.names = root, {}, {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        import psutil

        while not self.done.is_set():
            try:
                family = [psutil.Process(self.root), *psutil.Process(self.root).children(recursive=True)]
            except psutil.NoSuchProcess:
                family = []
            for process in family:
                try:
                    times = process.cpu_times()
                    self.seconds[process.pid] = times.user + times.system
                    name = " ".join(process.cmdline())[:200]  # a Ray worker retitles itself as it takes an actor
                    if "RayTrainWorker" not in self.names.get(process.pid, ""):
                        self.names[process.pid] = name
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            self.done.wait(0.5)

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.thread.join()
        groups = {"train worker": 0.0, "posetune command": 0.0, "ray and tune processes": 0.0}
        for pid, seconds in self.seconds.items():
            name = self.names.get(pid, "")
            key = "train worker" if "RayTrainWorker" in name else "posetune command" if pid == self.root else None
            groups[key or "ray and tune processes"] += seconds
        return {k: round(v, 1) for k, v in groups.items()}


def run(argv: list[str], code: Path | None = None) -> tuple[float, float, dict[str, float]]:
    """(wall seconds, start time, CPU seconds by group) of one `posetune` command in a fresh
    process (same imports and start-up for both); ``code``: a folder holding another version
    of the posetune package, imported instead of this checkout's."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(code or ""), os.environ.get("PYTHONPATH")]))}
    launched = time.time()
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "posetune", *argv], stdout=subprocess.DEVNULL, env=env)
    sampler = CpuSampler(process.pid)
    if process.wait() != 0:
        raise SystemExit(f"posetune {' '.join(argv)} failed (exit code {process.returncode})")
    wall = time.perf_counter() - start
    return wall, launched, sampler.stop()


def plain_run(overrides: dict, folder: Path) -> tuple[float, float, int]:
    """(training images/s over epochs 2..N, wall seconds, samples seen) of `posetune train`."""
    args = [f"{k}={v}" for k, v in {**overrides, "system.out_dir": folder}.items()]
    wall, _, _ = run(["train", "--config", str(REPO / "configs" / "quick.yaml"), *args])
    history = json.loads((folder / "metrics.json").read_text())["history"]
    return statistics.mean(h["train_images_per_s"] for h in history[1:]), wall, history[-1]["samples_seen"]


def versions() -> dict[str, str]:
    import ray
    import torch

    return {"python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__}


def plain_beside_idle_ray(overrides: dict, folder: Path) -> tuple[float, float, int]:
    """plain_run with a local Ray instance (GCS, raylet, dashboard, log monitor) idling beside
    it: what Ray's own processes cost the training, apart from Tune and Train."""
    import ray

    ray.init(num_cpus=2, include_dashboard=True, logging_level="ERROR")
    try:
        return plain_run(overrides, folder)
    finally:
        ray.shutdown()


def breakdown(results: list[dict], launched: float, wall: float) -> dict[str, float]:
    """Where a one-trial search's wall time goes, from the times its worker reported:
    start-up (Python, Ray, Tune, the trial driver, Train's controller and worker group) until
    the worker runs; training (samples / the worker's training images/s); evaluations, data
    set-up in the worker and the rest of the time between reports; the time reports held
    training up (metrics, checkpoint snapshot and upload); shut-down after the last report
    (Train, Tune, Ray, results and the best-checkpoint export)."""
    started = results[0]["workers_started_at"]
    previous, training = 0, 0.0
    for r in results:
        training += (r["samples_seen"] - previous) / r["train_images_per_s"]
        previous = r["samples_seen"]
    reports = sum(r.get("report_s", 0.0) for r in results[1:])  # each row holds the report before it
    worker = results[-1]["reported_at"] - started
    return {
        "startup_s": round(started - launched, 1),
        "training_s": round(training, 1),
        "evaluation_and_worker_setup_s": round(worker - training - reports, 1),
        "reports_s": round(reports, 2),
        "shutdown_s": round(launched + wall - results[-1]["reported_at"], 1),
    }


def search_run(
    overrides: dict, lr: float, samples: int, folder: Path, code: Path | None = None
) -> tuple[float, float, dict, dict]:
    """(training images/s over epochs 2..N, wall seconds, breakdown, CPU seconds by group) of
    the same training as a one-trial `posetune search` (with the posetune package in ``code``
    when given)."""
    space = {
        # An evaluation per epoch, as the plain run (a search evaluates at sample milestones).
        "base": {
            "config": str(REPO / "configs" / "quick.yaml"),
            "overrides": {**overrides, "val.eval_every_samples": samples // overrides["train.epochs"]},
        },
        "parameters": {"optimizer.lr": {"distribution": "fixed", "value": lr}},
        "search": {"num_samples": 1, "asha": {"max_samples": samples, "grace_samples": samples}},
        # 3 logical CPUs: the trial's 2-CPU worker plus its driver's sliver fit on a 2-core box.
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 2, "local_cpus": 3},
        "storage": {"name": "bench", "path": str(folder)},
        "tracking": {"enabled": False},
    }
    folder.mkdir(parents=True)
    (folder / "space.yaml").write_text(yaml.safe_dump(space))
    wall, launched, cpu = run(["search", str(folder / "space.yaml")], code)
    trial_dir = next((folder / "bench" / "tune").glob("trial-*"))
    results = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    rate = statistics.mean(r["train_images_per_s"] for r in results[1:])
    return rate, wall, breakdown(results, launched, wall), cpu


def package_at(revision: str, into: Path) -> Path:
    """The posetune package as of a git revision of this checkout, extracted under ``into``."""
    archive = subprocess.run(["git", "archive", revision, "posetune"], cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"--before {revision}: not a revision of this checkout ({archive.stderr.decode().strip()})")
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def compared(rounds: list[dict], revision: str, args: argparse.Namespace, figures: dict) -> list[str]:
    """The before/after table: each phase's median for REV and for this checkout."""
    keys = [k for k in rounds[0] if k.startswith("search_") and not k.startswith("search_cpu")]
    keys += [k for k in rounds[0] if k.startswith("search_cpu_s_")] + ["trial_train_img_s"]
    lines = [
        f"One-trial search, posetune at {revision} (before) and this checkout (after), alternating in "
        f"each of {args.rounds} rounds (configs/quick.yaml, {args.frames} frames, {args.epochs} epochs; "
        f"{figures['machine']}); medians: seconds, CPU seconds (cpu s rows), images/s (train img s)",
        "",
        "| | before | after | after - before |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key in keys:
        before = statistics.median(r["before_" + key] for r in rounds)
        after = statistics.median(r[key] for r in rounds)
        label = key.removeprefix("search_").replace("_", " ")
        lines.append(f"| {label} | {before} | {after} | {round(after - before, 1)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternating plain/search pairs (default 3)")
    parser.add_argument("--before", metavar="REV", help="also run the search with posetune as of git revision REV")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="posetune-orchestration-"))
    rounds = []
    try:
        before = package_at(args.before, work / "before") if args.before else None
        generate(work / "data", {"train": args.frames, "val": 200}, seed=0)
        overrides = {
            "dataset.root": str(work / "data"),
            "dataset.cache_dir": str(work / "cache"),
            "train.epochs": args.epochs,
            "val.eval_freq": 1,
            "system.progress": False,
        }
        cfg = load_config(REPO / "configs" / "quick.yaml", [f"{k}={v}" for k, v in overrides.items()], environ={})
        load_split(cfg, "train"), load_split(cfg, "val")  # build the cache outside every timing
        overrides["tracking.enabled"] = False  # both runs untracked: keep the user's MLflow store clean
        # Alternate the two so that drift on a shared host hits both alike.
        for n in range(args.rounds):
            plain_rate, plain_wall, samples = plain_run(overrides, work / f"plain-{n}")
            beside_rate, _, _ = plain_beside_idle_ray(overrides, work / f"beside-{n}")
            then = {}
            if before and n % 2:  # before first in odd rounds, after first in even ones
                then_run = search_run(overrides, cfg.optimizer.lr, samples, work / f"before-{n}", before)
            trial_rate, search_wall, phases, cpu = search_run(
                overrides, cfg.optimizer.lr, samples, work / f"search-{n}"
            )
            if before and not n % 2:
                then_run = search_run(overrides, cfg.optimizer.lr, samples, work / f"before-{n}", before)
            if before:
                then_rate, then_wall, then_phases, then_cpu = then_run
                then = {
                    "before_search_wall_s": round(then_wall, 1),
                    "before_trial_train_img_s": round(then_rate, 1),
                    **{f"before_search_{k}": v for k, v in then_phases.items()},
                    **{f"before_search_cpu_s_{k.replace(' ', '_')}": v for k, v in then_cpu.items()},
                }
            rounds.append(
                {
                    "plain_train_img_s": round(plain_rate, 1),
                    "trial_train_img_s": round(trial_rate, 1),
                    "plain_wall_s": round(plain_wall, 1),
                    "search_wall_s": round(search_wall, 1),
                    "throughput_ratio": round(trial_rate / plain_rate, 3),
                    "beside_ray_train_img_s": round(beside_rate, 1),
                    "beside_ray_ratio": round(beside_rate / plain_rate, 3),
                    "trial_vs_beside_ray_ratio": round(trial_rate / beside_rate, 3),
                    **{f"search_{k}": v for k, v in phases.items()},
                    **{f"search_cpu_s_{k.replace(' ', '_')}": v for k, v in cpu.items()},
                    **then,
                }
            )
            print(rounds[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    name = f"orchestration_before_{args.before}" if args.before else "orchestration"
    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "frames": args.frames,
        "epochs": args.epochs,
        "versions": versions(),
        "rounds": rounds,
        "median_throughput_ratio": round(median["throughput_ratio"], 3),
        "median_plain_wall_s": median["plain_wall_s"],
        "median_search_wall_s": median["search_wall_s"],
        "wall_ratio": round(median["search_wall_s"] / median["plain_wall_s"], 2),
        "startup_overhead_s": round(median["search_wall_s"] - median["plain_wall_s"], 1),
    }
    RESULTS.mkdir(exist_ok=True)
    if args.before:
        figures["before"] = args.before
    (RESULTS / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    lines = [
        f"Orchestration overhead (configs/quick.yaml, {args.frames} frames, {args.epochs} epochs, 2 threads each, "
        f"{args.rounds} alternating rounds; {figures['machine']}):",
        "",
        "| round | `posetune train` img/s | one-trial search img/s | ratio | train wall (s) | search wall (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {n + 1} | {r['plain_train_img_s']} | {r['trial_train_img_s']} | {r['throughput_ratio']} "
        f"| {r['plain_wall_s']} | {r['search_wall_s']} |"
        for n, r in enumerate(rounds)
    ]
    lines += [
        "",
        f"Median trial / plain training throughput: **{figures['median_throughput_ratio']}x**; median wall time "
        f"{figures['wall_ratio']}x, i.e. **{figures['startup_overhead_s']} s** of orchestration overhead "
        "(Ray start, Tune, the Train worker group, checkpoint reports).",
    ]
    lines += [
        "",
        f"`posetune train` beside an idle local Ray instance: {median['beside_ray_ratio']}x the plain run's "
        f"throughput; the trial against that: {median['trial_vs_beside_ray_ratio']}x (medians). The first is "
        "what Ray's own processes cost, the second what Tune, Train's controller and its worker add on top.",
    ]
    phase_keys = [k for k in rounds[0] if k.startswith("search_") and k.endswith("_s") and "cpu" not in k]
    phase_keys.remove("search_wall_s")
    lines += [
        "",
        "Where the one-trial search's wall time goes (median over rounds, seconds; from the times its "
        "worker reported):",
        "",
        "| " + " | ".join(k.removeprefix("search_").removesuffix("_s").replace("_", " ") for k in phase_keys) + " |",
        "| " + " | ".join("---:" for _ in phase_keys) + " |",
        "| " + " | ".join(str(median[k]) for k in phase_keys) + " |",
        "",
        "CPU seconds during the search (median over rounds): "
        + ", ".join(
            f"{k.removeprefix('search_cpu_s_').replace('_', ' ')} {median[k]}"
            for k in rounds[0]
            if k.startswith("search_cpu_s_")
        )
        + f"; the plain run's wall time is {figures['median_plain_wall_s']} s on the same 2 cores.",
    ]
    if args.before:
        lines += ["", *compared(rounds, args.before, args, figures)]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
