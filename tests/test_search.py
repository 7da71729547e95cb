"""posetune search against a real local Ray instance (started here with explicit CPUs)."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from posetune import cli
from posetune.choices import DIVERGED_SCORE
from posetune.config import load_config
from posetune.search.results import Outcome
from posetune.search.run import plan_resources, run_search
from posetune.search.space import load_space

from helpers import read_results, tiny_space, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def test_a_cluster_running_on_this_node_is_found_and_used(ray_cluster):
    """posetune looks for a local cluster through Ray's private GCS address lookup, and joins a
    running one instead of starting its own."""
    from posetune import internals
    from posetune.cluster.placement import connect_ray

    assert internals.local_cluster_running()
    assert connect_ray(2) is False  # it did not start Ray: the fixture's instance is used
    assert ray_cluster.cluster_resources()["CPU"] == 2


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def search(ray_cluster, synth_small, tmp_path_factory):
    """One search of 4 trials that the tests below each check a part of. Batch sizes 16 and 32
    on 96-frame epochs, evaluated and judged by ASHA at the same sample counts (64, 128, 192,
    256: mid-epoch), rungs at 64 and 128."""
    tmp_path = tmp_path_factory.mktemp("search")
    path = tiny_space(
        tmp_path,
        synth_small,
        resources__prices={"CPU": 0.05},
        search__points_to_evaluate=[
            {"optimizer.lr": 3e-3, "train.beta_loss": 1.0, "train.batch_size": 16},
            {"optimizer.lr": 1e-4, "train.beta_loss": 1.0, "train.batch_size": 32},
            {"optimizer.lr": 2e-3, "train.beta_loss": 1.0, "train.batch_size": 32},
        ],
        search__asha={"max_samples": 256, "grace_samples": 64, "reduction_factor": 2},
        **{"parameters__train.batch_size": {"distribution": "choice", "values": [16, 32]}},
    )
    space, base = load_space(path)
    # What a search killed before Tune's first snapshot leaves: a results.json, no tune/ state.
    ghost = {"trials": [{"id": "ghost", "params": {}, "status": "running"}]}
    (tmp_path / "runs" / "t").mkdir(parents=True)
    (tmp_path / "runs" / "t" / "results.json").write_text(json.dumps(ghost))
    logger, progress = logging.getLogger("posetune"), _Lines()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(progress)
    try:
        summary = run_search(space, base)
    finally:
        logger.removeHandler(progress)
        logger.setLevel(level)
    records = read_results(tmp_path)
    return SimpleNamespace(
        tmp_path=tmp_path,
        folder=tmp_path / "runs" / "t",
        summary=summary,
        records=records,
        statuses=[r["status"] for r in records],
        progress=progress.lines,
        scratch_left=list(Path(tempfile.gettempdir()).glob("posetune-trial-*")),
    )


def test_every_trial_completes_or_is_stopped_early_with_its_metrics(search):
    assert len(search.records) == 4 and not search.summary.interrupted
    assert set(search.statuses) <= {"completed", "stopped_early"}
    assert search.statuses.count("stopped_early") >= 1 and search.statuses.count("completed") >= 1
    for r in search.records:  # every trial's metrics reached Tune
        assert r["samples_seen"] >= 64 and "pose_error" in r["metrics"] and "orientation_error_deg" in r["metrics"]
        assert (r["status"] == "completed") == (r["samples_seen"] == 256)
    assert {r["params"]["train.batch_size"] for r in search.records} == {16, 32}


def test_a_killed_searchs_stale_results_are_not_merged_into_a_new_one(search):
    """The fixture's folder held the results.json of a search killed before Tune's first
    snapshot: its "running" ghost neither shows up nor makes the new search "interrupted"."""
    assert "ghost" not in {r["id"] for r in search.records} and not search.summary.interrupted


def test_every_batch_size_reports_at_the_same_milestones_and_is_stopped_at_a_rung(search):
    """Equal compute: every trial reported at the shared milestones, whatever its batch size,
    and those ASHA stopped were stopped at a rung."""
    for trial_dir in (search.folder / "tune").glob("trial-*"):
        seen = [json.loads(line)["samples_seen"] for line in (trial_dir / "result.json").read_text().splitlines()]
        assert seen == [64, 128, 192, 256][: len(seen)], (trial_dir.name, seen)
    assert {r["samples_seen"] for r in search.records if r["status"] == "stopped_early"} <= {64, 128}


def test_progress_goes_through_logging(search):
    assert any("stopped early" in line for line in search.progress)
    assert any("best " in line for line in search.progress)


def test_cost_is_the_cpu_hours_trial_workers_held_at_the_price(search):
    """0.95 CPU each while they ran, one at a time, so never more than the search's wall time;
    the cost is those hours at resources.prices."""
    summary = search.summary
    cpu_hours = [r["resource_hours"]["CPU"] for r in search.records]
    assert all(h > 0 for h in cpu_hours) and "GPU" not in summary.compute.resource_hours
    assert summary.compute.resource_hours["CPU"] == pytest.approx(sum(cpu_hours))
    assert sum(cpu_hours) < 0.95 * summary.seconds / 3600
    assert summary.compute.cost == pytest.approx(0.05 * sum(cpu_hours))
    assert json.loads((search.folder / "results.json").read_text())["compute"]["cost"] == summary.compute.cost
    assert "CPU-hours held by trial workers; cost" in (search.folder / "summary.txt").read_text()


def test_optuna_is_told_stopped_trials_as_pruned_at_the_step_they_stopped(search):
    state_file = next((search.folder / "tune").glob("searcher-state-*.pkl"))
    study = pickle.loads(state_file.read_bytes())["_ot_study"]
    told = sorted(t.state.name for t in study.trials)
    assert told.count("PRUNED") == search.statuses.count("stopped_early")
    assert told.count("COMPLETE") == search.statuses.count("completed")
    # Each pruned trial's intermediate values run up to where ASHA stopped it (step = samples).
    stopped_at = sorted(r["samples_seen"] for r in search.records if r["status"] == "stopped_early")
    assert sorted(t.last_step for t in study.trials if t.state.name == "PRUNED") == stopped_at


def test_no_trial_scratch_folder_is_left(search):
    """Those of workers ASHA killed included."""
    assert search.scratch_left == []


def test_the_best_config_trains_and_the_best_checkpoint_evaluates(search, tmp_path):
    folder, summary = search.folder, search.summary
    assert summary.best_config_file == str(folder / "best_config.yaml") and (folder / "best" / "model.pt").exists()
    assert (folder / "summary.txt").read_text().startswith("4 trials in")
    out_dir = f"system.out_dir={tmp_path / 'retrain'}"
    assert cli.main(["train", "--config", summary.best_config_file, "train.epochs=1", out_dir]) == 0
    assert (tmp_path / "retrain" / "checkpoints" / "best.pt").exists()
    assert cli.main(["evaluate", "--checkpoint", str(folder / "best" / "model.pt")]) == 0


def test_results_prints_the_trials_as_json_or_a_table_and_refuses_an_unknown_name(search, capsys):
    runs = f"storage.path={search.tmp_path / 'runs'}"
    capsys.readouterr()
    assert cli.main(["results", "t", "--json", runs]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [t["id"] for t in printed["trials"]] == [r["id"] for r in search.records]
    assert set(printed["trials"][0]) >= {"id", "params", "status", "metrics", "samples_seen"}
    assert cli.main(["results", "t", runs]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:4] == ["trial", "status", "samples", "pose_error"]
    assert cli.main(["results", "nope", runs]) == 2


def test_two_worker_trial_trains_with_ddp(ray_cluster, synth_small, tmp_path):
    path = tiny_space(
        tmp_path,
        synth_small,
        name="ddp",
        resources__workers_per_trial=2,
        search__num_samples=1,
        search__points_to_evaluate=[],
    )
    space, base = load_space(path)
    run_search(space, base)
    (record,) = read_results(tmp_path, "ddp")
    assert record["status"] == "completed", record
    # 2 ranks x 16 per step: 96 frames give 3 steps (96 samples) per epoch, 4 epochs.
    assert record["samples_seen"] == 384 and record["metrics"]["translation_error_cm"] > 0
    # The exported config trains on one process with the trial's effective batch: the two
    # ranks' batches become twice the accumulation steps.
    exported = load_config(str(tmp_path / "runs" / "ddp" / "best_config.yaml"), environ={})
    assert exported.train.accumulation_steps == 2 * base.train.accumulation_steps
    assert exported.checkpoint.monitor == space.search.metric  # best.pt is chosen by the search's metric


def test_a_diverged_trial_ends_diverged_and_is_never_the_best(ray_cluster, synth_small, tmp_path):
    path = tiny_space(
        tmp_path,
        synth_small,
        name="nan",
        **{"parameters__optimizer.lr": {"distribution": "loguniform", "low": 1e11, "high": 1e12}},
        search__num_samples=1,
        search__points_to_evaluate=[],
    )
    space, base = load_space(path, ["optimizer.schedule=constant"])
    summary = run_search(space, base)
    (record,) = read_results(tmp_path, "nan")
    assert record["status"] == "diverged" and "lower optimizer.lr" in record["error"], record
    assert summary.counts[Outcome.DIVERGED] == 1
    # A diverged trial is never the search's best: nothing is exported from it.
    assert summary.best is None and not (tmp_path / "runs" / "nan" / "best_config.yaml").exists()
    # ASHA saw NaN (its cut-offs ignore it: tests/test_searchers.py).
    trial_dir = next((tmp_path / "runs" / "nan" / "tune").glob("trial-*"))
    last = json.loads((trial_dir / "result.json").read_text().splitlines()[-1])
    assert last["diverged"] == 1 and math.isnan(last["pose_error"])
    # Optuna was told PRUNED with the worst score at step 0: below every stopped trial.
    state_file = next((tmp_path / "runs" / "nan" / "tune").glob("searcher-state-*.pkl"))
    (told,) = pickle.loads(state_file.read_bytes())["_ot_study"].trials
    assert told.state.name == "PRUNED" and told.intermediate_values == {0: DIVERGED_SCORE}


def test_worker_killed_mid_trial_resumes_from_its_checkpoint(ray_cluster, synth_small, tmp_path):
    import psutil

    path = tiny_space(
        tmp_path,
        synth_small,
        name="kill",
        search__num_samples=1,
        search__points_to_evaluate=[],
        search__asha={"max_samples": 768, "grace_samples": 96, "reduction_factor": 2},
    )
    space, base = load_space(path)
    killed: list[int] = []

    def kill_worker_after_two_reports():
        def reported_twice():
            records = read_results(tmp_path, "kill")
            return records and records[0]["samples_seen"] >= 192

        wait_for(reported_twice, 300, "two evaluations")
        for process in psutil.process_iter(["cmdline"]):
            if "RayTrainWorker" in " ".join(process.info["cmdline"] or []):
                process.kill()
                killed.append(process.pid)

    killer = threading.Thread(target=kill_worker_after_two_reports, daemon=True)
    killer.start()
    run_search(space, base)
    killer.join(timeout=5)
    assert killed, "no Ray Train worker was found to kill"
    (record,) = read_results(tmp_path, "kill")
    assert record["status"] == "completed" and record["samples_seen"] == 768
    # Tune's record of the trial: samples seen only ever grow, so the restarted worker
    # continued from its checkpoint instead of starting over.
    trial_dir = next((tmp_path / "runs" / "kill" / "tune").glob("trial-*"))
    seen = [json.loads(line)["samples_seen"] for line in (trial_dir / "result.json").read_text().splitlines()]
    assert seen == sorted(set(seen)) and seen[-1] == 768, seen


def test_resource_plan_of_the_shipped_spaces():
    from posetune.cluster.placement import ClusterShape, Node
    from posetune.errors import ConfigError

    def one_node(**resources):
        return ClusterShape([Node({k: float(v) for k, v in resources.items()})])

    space, _ = load_space("search_spaces/quick.yaml")
    assert plan_resources(space, one_node(CPU=2)).concurrency == 2
    assert plan_resources(space, one_node(CPU=16)).concurrency == 8  # never more than num_samples
    default, _ = load_space("search_spaces/default.yaml")
    plan = plan_resources(default, one_node(CPU=48, GPU=4))
    assert plan.use_gpu and plan.concurrency == 4
    assert not plan_resources(default, one_node(CPU=48)).use_gpu
    with pytest.raises(ConfigError, match=r"one trial needs 1 worker\(s\) of \{CPU: 6\} but no node can hold that"):
        plan_resources(default, one_node(CPU=2))


def test_scratch_of_dead_workers_is_swept(tmp_path, monkeypatch):
    from posetune.search.trial import sweep_scratch

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None  # re-read TMPDIR
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        (tmp_path / f"posetune-trial-{dead.stdout.strip()}-abc" / "run").mkdir(parents=True)
        (tmp_path / f"posetune-trial-{os.getpid()}-def").mkdir()
        assert sweep_scratch() == 1
        assert [p.name for p in tmp_path.iterdir()] == [f"posetune-trial-{os.getpid()}-def"]
        # A killed worker its parent has not reaped yet is gone; one still exiting is waited for.
        killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        exiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
        for pid in (killed.pid, exiting.pid):
            (tmp_path / f"posetune-trial-{pid}-ghi").mkdir()
        killed.kill()
        wait_for(lambda: psutil.Process(killed.pid).status() == psutil.STATUS_ZOMBIE, 10, "the killed child")
        assert sweep_scratch() == 1 and (tmp_path / f"posetune-trial-{exiting.pid}-ghi").exists()
        assert sweep_scratch(wait_s=30) == 1
        assert [p.name for p in tmp_path.iterdir()] == [f"posetune-trial-{os.getpid()}-def"]
        killed.wait(), exiting.wait()
    finally:
        tempfile.tempdir = None


def test_a_train_run_restored_at_its_final_checkpoint_says_again_how_it_ended(ray_cluster, synth_small, tmp_path):
    """Tune may restart a trial that finished after its state was last saved: the trial's Train
    run (same name and storage) resumes at its final checkpoint, has nothing left to train, and
    reports its last evaluation again rather than nothing (which would make it stopped_early)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from posetune.search.run import absolute_paths
    from posetune.search.trial import budget_config, train_worker

    space, base = load_space(
        tiny_space(tmp_path, synth_small, name="final", search__asha={"max_samples": 192, "grace_samples": 96})
    )
    cfg = budget_config(space, absolute_paths(base), 96, {"optimizer.lr": 1e-3, "train.beta_loss": 1.0})
    storage_path = str(tmp_path / "train")
    reports = tmp_path / "reports.jsonl"

    class Reports(ray.train.UserCallback):  # what TuneReportCallback would pass on to Tune
        def after_report(self, run_context, metrics, checkpoint):
            with open(reports, "a") as out:
                out.write(json.dumps({**metrics[0], "checkpoint": checkpoint is not None}) + "\n")

    def fit_trial(lr: float):
        cfg.optimizer.lr = lr  # a changed lr changes nothing if the run is restored, not trained again
        return TorchTrainer(
            train_worker,
            train_loop_config={
                "config": cfg.to_dict(),
                "metric": "pose_error",
                "mode": "min",
                "train_storage": storage_path,
            },
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name="trial-final", storage_path=storage_path, callbacks=[Reports()]),
        ).fit()

    fit_trial(1e-3)
    first = [json.loads(line) for line in reports.read_text().splitlines()]
    reports.unlink()
    fit_trial(3e-3)
    (again,) = [json.loads(line) for line in reports.read_text().splitlines()]
    assert [r["samples_seen"] for r in first] == [96, 192]
    assert again["samples_seen"] == 192 and again["pose_error"] == first[-1]["pose_error"]
    assert again["checkpoint"]  # the final checkpoint is attached again


def one_cpu_trial_setup(space, base, tmp_path, finished=None, failed=None):
    """The TrialSetup a search of `space` would pass its trials on a 2-CPU node, 96 samples."""
    from posetune.cluster.placement import ClusterShape, Node
    from posetune.cluster.placement import plan_resources as plan_for_nodes
    from posetune.search.trial import TrialSetup

    plan = plan_for_nodes(
        workers_per_trial=1,
        cpus_per_worker=1,
        gpus_per_worker=0,
        num_samples=2,
        max_concurrent_trials=None,
        cluster=ClusterShape([Node({"CPU": 2.0})]),
    )
    return TrialSetup(space, base.to_dict(), 96, plan, str(tmp_path / "train"), finished or {}, failed or {})


def test_trials_that_ended_before_a_resume_send_no_events(synth_small, tmp_path):
    """Tune may restart a trial whose end it had not saved: the trial re-reports its recorded
    end, or fails again at once if it had failed (trial.run_trial), and no listener hears of it,
    so its record and MLflow run stay final."""
    from posetune.search.results import SearchResults, TrialEnded, TrialStarted
    from posetune.search.run import TrialEvents

    space, base = load_space(tiny_space(tmp_path, synth_small))
    results = SearchResults(str(tmp_path / "results.json"), "pose_error", "min", {})
    results.on_event(TrialStarted("done", {"optimizer.lr": 1e-3}, base))
    results.on_event(TrialEnded("done", {"optimizer.lr": 1e-3}, Outcome.STOPPED_EARLY, 96, None, None, {}))
    results.on_event(TrialStarted("broken", {"optimizer.lr": 1e-3}, base))
    results.on_event(TrialEnded("broken", {"optimizer.lr": 1e-3}, Outcome.FAILED, 0, "boom", None, {}))
    finished = results.finished()
    assert set(finished) == {"done"}  # a failed trial is not an ending to replay
    assert finished["done"]["samples_seen"] == 96

    assert results.failed() == {"broken": "boom"}  # a resume without --retry-failed keeps it failed
    setup = one_cpu_trial_setup(space, base, tmp_path, finished, results.failed())
    heard = []
    events = TrialEvents([SimpleNamespace(on_event=heard.append)], setup, str(tmp_path))
    for trial_id in ("done", "broken", "new"):
        trial = SimpleNamespace(
            trial_id=trial_id, config={"optimizer.lr": 1e-3, "train.beta_loss": 1.0}, last_result={}
        )
        events.on_trial_start(0, [], trial)
        events.on_trial_complete(0, [], trial)
    assert [(type(e).__name__, e.trial_id) for e in heard] == [("TrialStarted", "new"), ("TrialEnded", "new")]
    assert heard[1].resource_hours["CPU"] > 0 and heard[0].params["optimizer.lr"] == 1e-3


def test_a_trial_that_diverged_late_keeps_its_checkpoint_and_is_ranked_after_the_others(synth_small, tmp_path):
    """Its last report (the divergence) carries no checkpoint: its end names the latest one
    it reported, so its record and MLflow run keep its best.pt; it is never the best trial."""
    from posetune.choices import diverged_result
    from posetune.search.results import SearchResults
    from posetune.search.run import TrialEvents

    space, base = load_space(tiny_space(tmp_path, synth_small))
    setup = one_cpu_trial_setup(space, base, tmp_path)
    results = SearchResults(str(tmp_path / "results.json"), "pose_error", "min", {})
    events = TrialEvents([results], setup, str(tmp_path))
    config = {"optimizer.lr": 1e-3, "train.beta_loss": 1.0}
    late = SimpleNamespace(trial_id="late", config=config, last_result={})
    steady = SimpleNamespace(trial_id="steady", config=config, last_result={})
    checkpoint = str(tmp_path / "train" / "late" / "checkpoint_000001")
    for trial in (late, steady):
        events.on_trial_start(0, [], trial)
    events.on_trial_result(0, [], late, {"pose_error": 5.0, "samples_seen": 96, "checkpoint_path": checkpoint})
    late.last_result = diverged_result("pose_error", "loss is nan", 150)
    events.on_trial_result(0, [], late, late.last_result)
    events.on_trial_complete(0, [], late)
    steady.last_result = {"pose_error": 9.0, "samples_seen": 96}
    events.on_trial_result(0, [], steady, steady.last_result)
    events.on_trial_complete(0, [], steady)
    assert results.records["late"].status is Outcome.DIVERGED and results.records["late"].checkpoint == checkpoint
    assert [r.id for r in results.ranked()] == ["steady", "late"] and results.best().id == "steady"
