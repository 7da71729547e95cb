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
Each round also runs the pair on a share of its own (PINNED: the training alone on core 0 with
one thread, everything else on core 1) and the search joining a Ray instance started before it
(as on a `ray up` head): the training's throughput without Ray's processes on its cores, and
what a trial costs once Ray is up. About 20 minutes on 2 cores with the defaults. The joined
runs end with `ray stop`, which stops every Ray instance of this user on the machine: run the
benchmark where no other Ray instance runs.
Writes benchmarks/results/orchestration.{json,md}.

With ``--before REV`` each round also runs the same one-trial search with posetune as of git
revision REV (its package extracted with `git archive`, first on the path), before or after
the current code's (alternating): a change's effect on each phase, before and after in one run.
Writes benchmarks/results/orchestration_before_REV.{json,md} instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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
    monitor, the Tune trial driver and Train's controller); the worker's also split into its
    ``training_threads`` busiest threads (the training: torch's) and its other threads (Ray's,
    Train's, the checkpoint upload)."""

    def __init__(self, root: int, worker_cores: set[int] | None = None, training_threads: int = 1):
        import threading

        self.root, self.seconds, self.names, self.threads = root, {}, {}, {}
        self.training_threads = training_threads
        self.worker_cores = worker_cores
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
                    if "RayTrainWorker" in self.names[process.pid]:
                        # Kept per thread id: a thread that ended (Train's training thread does)
                        # keeps its last reading.
                        self.threads.setdefault(process.pid, {}).update(
                            {t.id: t.user_time + t.system_time for t in process.threads()}
                        )
                        if self.worker_cores:
                            pin(process, self.worker_cores)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            self.done.wait(0.1 if self.worker_cores else 0.5)

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.thread.join()
        groups = {"train worker": 0.0, "posetune command": 0.0, "ray and tune processes": 0.0}
        for pid, seconds in self.seconds.items():
            name = self.names.get(pid, "")
            key = "train worker" if "RayTrainWorker" in name else "posetune command" if pid == self.root else None
            groups[key or "ray and tune processes"] += seconds
        threads = [sorted(times.values()) for times in self.threads.values()]
        training = sum(sum(times[-self.training_threads :]) for times in threads)
        groups["train worker training threads"] = training
        groups["train worker other threads"] = sum(map(sum, threads)) - training
        return {k: round(v, 1) for k, v in groups.items()}


def pin(process, cores: set[int]) -> None:
    """Every thread of a process onto ``cores`` (the affinity of a pid is its main thread's;
    threads started later inherit it from the thread that starts them)."""
    for thread in process.threads():
        with contextlib.suppress(OSError):  # the thread ended
            os.sched_setaffinity(thread.id, cores)


@dataclass(frozen=True)
class Share:
    """Which cores a run gets: ``command`` for the posetune command and all it starts (Ray's
    processes, Tune, the trial driver), ``worker`` for the Ray Train worker, moved there as
    soon as it appears; ``threads`` for torch in the training process. None: all cores."""

    threads: int
    command: set[int] | None = None
    worker: set[int] | None = None


SHARED = Share(threads=2)  # everything on both cores, 2 torch threads (as a user runs it)
# The training on core 0 alone, Ray's and Tune's processes on core 1: what a node whose
# cores Ray's processes do not take from the training gives (2 cores allow 1 for training).
PINNED = Share(threads=1, command={1}, worker={0})


def run(
    argv: list[str], code: Path | None = None, share: Share = SHARED, env: dict | None = None
) -> tuple[float, float, dict[str, float]]:
    """(wall seconds, start time, CPU seconds by group) of one `posetune` command in a fresh
    process (same imports and start-up for both); ``code``: a folder holding another version
    of the posetune package, imported instead of this checkout's."""
    path = os.pathsep.join(filter(None, [str(code or ""), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **(env or {}), "PYTHONPATH": path}
    cores = share.command

    def on_its_cores() -> None:
        if cores:
            os.sched_setaffinity(0, cores)

    launched = time.time()
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "posetune", *argv], stdout=subprocess.DEVNULL, env=env, preexec_fn=on_its_cores
    )
    sampler = CpuSampler(process.pid, share.worker, share.threads)
    if process.wait() != 0:
        raise SystemExit(f"posetune {' '.join(argv)} failed (exit code {process.returncode})")
    wall = time.perf_counter() - start
    return wall, launched, sampler.stop()


def plain_run(overrides: dict, folder: Path, share: Share = SHARED) -> tuple[float, float, int]:
    """(training images/s over epochs 2..N, wall seconds, samples seen) of `posetune train`,
    on the worker's cores of ``share`` with its threads."""
    args = [f"{k}={v}" for k, v in {**overrides, "system.out_dir": folder}.items()]
    on_worker_cores = Share(share.threads, command=share.worker)
    threads = {"OMP_NUM_THREADS": str(share.threads)}  # as Ray sets it for a worker of that many CPUs
    wall, _, _ = run(
        ["train", "--config", str(REPO / "configs" / "quick.yaml"), *args], share=on_worker_cores, env=threads
    )
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


def search_joining_ray(overrides: dict, lr: float, samples: int, folder: Path) -> tuple[float, float, dict, dict]:
    """search_run joining a Ray instance started before it and stopped after it (`ray start
    --head`, as a `ray up` head runs one): what a trial costs once Ray is up, without Ray's own
    start and shut-down."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray = [str(Path(sys.executable).parent / "ray")]
    cpus = str(SHARED.threads + 1)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run(
        [*ray, "start", "--head", f"--port={port}", f"--num-cpus={cpus}", "--disable-usage-stats"], check=True, **quiet
    )
    try:
        time.sleep(5)  # let the head's pre-started workers settle, as on a head that has been up a while
        return search_run(overrides, lr, samples, folder, ray_address=f"127.0.0.1:{port}")
    finally:
        subprocess.run([*ray, "stop"], check=False, **quiet)


def other_shares(overrides: dict, lr: float, samples: int, work: Path, n: int) -> dict[str, float]:
    """Round n's figures for the pair on a share of its own (PINNED: the training on core 0,
    this process and everything the search starts on core 1) and for the search joining a
    running Ray instance."""
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, PINNED.command)  # this process and its sampler off the training's core
    try:
        plain_rate, plain_wall, _ = plain_run(overrides, work / f"pinned-plain-{n}", PINNED)
        trial_rate, search_wall, _, _ = search_run(overrides, lr, samples, work / f"pinned-search-{n}", share=PINNED)
    finally:
        os.sched_setaffinity(0, own)
    joined_rate, joined_wall, joined, _ = search_joining_ray(overrides, lr, samples, work / f"joined-{n}")
    return {
        "pinned_plain_train_img_s": round(plain_rate, 1),
        "pinned_trial_train_img_s": round(trial_rate, 1),
        "pinned_throughput_ratio": round(trial_rate / plain_rate, 3),
        "pinned_plain_wall_s": round(plain_wall, 1),
        "pinned_search_wall_s": round(search_wall, 1),
        "joined_trial_train_img_s": round(joined_rate, 1),
        "joined_search_wall_s": round(joined_wall, 1),
        **{f"joined_{k}": v for k, v in joined.items()},
    }


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
    overrides: dict,
    lr: float,
    samples: int,
    folder: Path,
    code: Path | None = None,
    share: Share = SHARED,
    ray_address: str | None = None,
) -> tuple[float, float, dict, dict]:
    """(training images/s over epochs 2..N, wall seconds, breakdown, CPU seconds by group) of
    the same training as a one-trial `posetune search` (with the posetune package in ``code``
    when given; joining the Ray instance at ``ray_address`` when given, as on a `ray up` head)."""
    space = {
        # An evaluation per epoch, as the plain run (a search evaluates at sample milestones).
        "base": {
            "config": str(REPO / "configs" / "quick.yaml"),
            "overrides": {**overrides, "val.eval_every_samples": samples // overrides["train.epochs"]},
        },
        "parameters": {"optimizer.lr": {"distribution": "fixed", "value": lr}},
        "search": {"num_samples": 1, "asha": {"max_samples": samples, "grace_samples": samples}},
        # One logical CPU more than the worker's: its trial driver's sliver fits beside it.
        "resources": {"workers_per_trial": 1, "cpus_per_worker": share.threads, "local_cpus": share.threads + 1},
        "storage": {"name": "bench", "path": str(folder)},
        "tracking": {"enabled": False},
    }
    folder.mkdir(parents=True)
    (folder / "space.yaml").write_text(yaml.safe_dump(space))
    env = {"RAY_ADDRESS": ray_address} if ray_address else None
    wall, launched, cpu = run(["search", str(folder / "space.yaml")], code, share, env)
    trial_dir = next((folder / "bench" / "tune").glob("trial-*"))
    results = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    rate = statistics.mean(r["train_images_per_s"] for r in results[1:])
    checkpoints = [c for c in (folder / "bench" / "train").glob("*/checkpoint_*") if c.is_dir()]
    latest = max(checkpoints, key=lambda c: c.name)  # named by the time of their report
    uploaded = sum(f.stat().st_size for f in latest.iterdir()) / 2**20
    return rate, wall, {**breakdown(results, launched, wall), "checkpoint_mib_per_report": round(uploaded, 1)}, cpu


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


def other_shares_table(rounds: list[dict], median: dict, figures: dict) -> list[str]:
    """The pinned pair and the search joining a running Ray instance, per round and medians."""
    joined = [
        k for k in rounds[0] if k.startswith("joined_") and k.endswith("_s") and "wall" not in k and "img" not in k
    ]
    return [
        "On a share of its own: the training on core 0 alone with 1 thread (`posetune train` pinned there; "
        "the trial's Ray Train worker moved there as it starts), Ray's and Tune's processes, the trial driver "
        "and this benchmark on core 1:",
        "",
        "| round | `posetune train` img/s | one-trial search img/s | ratio | train wall (s) | search wall (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {n + 1} | {r['pinned_plain_train_img_s']} | {r['pinned_trial_train_img_s']} "
            f"| {r['pinned_throughput_ratio']} | {r['pinned_plain_wall_s']} | {r['pinned_search_wall_s']} |"
            for n, r in enumerate(rounds)
        ),
        "",
        "Median trial / plain training throughput on a share of its own: "
        f"**{figures['pinned_median_throughput_ratio']}x**; wall time {figures['pinned_wall_ratio']}x "
        "(Ray's start on one core).",
        "",
        "The search joining a Ray instance started before it (`ray start --head`, as a `ray up` head runs one; "
        "not timed), on both cores as in the first table:",
        "",
        "| round | search img/s | search wall (s) | "
        + " | ".join(k.removeprefix("joined_").removesuffix("_s").replace("_", " ") for k in joined)
        + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in joined) + " |",
        *(
            f"| {n + 1} | {r['joined_trial_train_img_s']} | {r['joined_search_wall_s']} | "
            + " | ".join(str(r[k]) for k in joined)
            + " |"
            for n, r in enumerate(rounds)
        ),
        "",
        f"Median wall time joining a running Ray instance: {median['joined_search_wall_s']} s, "
        f"**{figures['joined_wall_ratio']}x** the plain run's ({figures['joined_overhead_s']} s of overhead "
        f"per trial); training throughput {figures['joined_throughput_ratio']}x the plain run's (ratio of medians).",
    ]


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
            others = {} if before else other_shares(overrides, cfg.optimizer.lr, samples, work, n)
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
                    **others,
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
    if not args.before:
        figures |= {
            "pinned_median_throughput_ratio": median["pinned_throughput_ratio"],
            "pinned_wall_ratio": round(median["pinned_search_wall_s"] / median["pinned_plain_wall_s"], 2),
            "joined_wall_ratio": round(median["joined_search_wall_s"] / median["plain_wall_s"], 2),
            "joined_overhead_s": round(median["joined_search_wall_s"] - median["plain_wall_s"], 1),
            "joined_throughput_ratio": round(median["joined_trial_train_img_s"] / median["plain_train_img_s"], 3),
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
        "",
        f"Each report hands Ray Train a checkpoint of {median['search_checkpoint_mib_per_report']} MiB to upload "
        "(the trial's latest: last.pt and best.pt).",
    ]
    if args.before:
        lines += ["", *compared(rounds, args.before, args, figures)]
    else:
        lines += ["", *other_shares_table(rounds, median, figures)]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
