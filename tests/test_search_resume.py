"""The search driver as a user runs it: killed, interrupted, resumed. Each command starts its
own local Ray instance (none may be running when this module starts)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from search_helpers import REPO, kill_ray_leftovers, ray_processes, read_results, tiny_space, wait_for

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(autouse=True)
def _no_ray_before_or_after():
    assert not ray_processes(), "a Ray instance is already running; these tests start their own"
    yield
    try:
        wait_for(lambda: not ray_processes(), 60, "Ray processes to exit")
    finally:
        kill_ray_leftovers()


def start_search(log_dir, *args: str) -> subprocess.Popen:
    """Output goes to files: an unread pipe fills up and blocks the driver."""
    with open(log_dir / "stdout.txt", "w") as stdout, open(log_dir / "stderr.txt", "w") as stderr:
        command = [sys.executable, "-m", "posetune", "search", *args]
        return subprocess.Popen(command, cwd=REPO, stdout=stdout, stderr=stderr)


def test_sigkill_then_resume_skips_finished_trials(synth_small, tmp_path):
    # grace = budget: ASHA stops nothing, so every trial runs long enough to be caught running.
    space = tiny_space(
        tmp_path,
        synth_small,
        name="k",
        search__num_samples=3,
        search__asha={"max_samples": 576, "grace_samples": 576, "reduction_factor": 2},
        search__points_to_evaluate=[{"optimizer.lr": 3e-3, "train.beta_loss": 1.0}],
    )
    driver = start_search(tmp_path, str(space))

    def one_done_and_next_reporting():
        records = read_results(tmp_path, "k")
        done = [r for r in records if r["status"] in ("completed", "stopped_early")]
        running = [r for r in records if r["status"] == "running" and r["samples_seen"] >= 192]
        return done and running

    try:
        wait_for(one_done_and_next_reporting, 400, "a finished trial and a running one with two results")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    before = {r["id"]: r for r in read_results(tmp_path, "k")}
    finished = {i for i, r in before.items() if r["status"] != "running"}
    (interrupted,) = [i for i, r in before.items() if r["status"] == "running"]
    # Ray's processes share the driver's fate: nothing is left running.
    wait_for(lambda: not ray_processes(), 60, "Ray processes to exit after SIGKILL")

    resumed = subprocess.run(
        [sys.executable, "-m", "posetune", "search", str(space), "--resume"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = {r["id"]: r for r in read_results(tmp_path, "k")}
    assert len(after) == 3 and all(r["status"] in ("completed", "stopped_early") for r in after.values())
    for trial in finished:  # not re-run
        assert after[trial] == before[trial]
        assert f"trial {trial} started" not in resumed.stdout
    # The interrupted trial continued from its checkpoint: its first result after the resume
    # is past what it had reached, not a fresh first epoch.
    first = next(line for line in resumed.stdout.splitlines() if f"trial {interrupted} " in line and "samples" in line)
    samples = int(first.split("samples")[0].split()[-1].replace(",", ""))
    assert samples > 96, first
    assert "3 trials in" in resumed.stdout
    # posetune.worker_logging keeps Ray Train's routine end-of-trial clean-up out of the output.
    assert "Cleaning up placement group" not in resumed.stdout + resumed.stderr

    # MLflow: one parent, exactly one child per trial; the interrupted trial continued its run.
    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("k").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("posetune.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["posetune.trial_id"] for r in children) == sorted(after)
    (continued,) = [r for r in children if r.data.tags["posetune.trial_id"] == interrupted]
    steps = [m.step for m in client.get_metric_history(continued.info.run_id, "pose_error")]
    # Calls still queued in the killed driver are lost; nothing is logged twice.
    assert steps == sorted(set(steps)) and steps[-1] == 576 and len(steps) >= 4, steps
    assert continued.data.tags["posetune.status"] == "completed" and parent.info.status == "FINISHED"


def test_ctrl_c_prints_how_to_resume(synth_small, tmp_path):
    space = tiny_space(
        tmp_path,
        synth_small,
        name="c",
        search__num_samples=2,
        search__asha={"max_samples": 1920, "grace_samples": 96, "reduction_factor": 2},
    )
    driver = start_search(tmp_path, str(space), "--name", "c")
    try:
        wait_for(lambda: any(r["samples_seen"] for r in read_results(tmp_path, "c")), 300, "a first result")
    finally:
        driver.send_signal(signal.SIGINT)
        driver.wait(timeout=180)
    err = (tmp_path / "stderr.txt").read_text()
    assert driver.returncode == 130, err[-3000:]
    assert f"posetune search {space} --resume --name c" in err
    assert "Traceback" not in err


def test_resume_without_a_search_and_restart_over_an_existing_one(synth_small, tmp_path):
    space = tiny_space(tmp_path, synth_small, name="r")
    missing = subprocess.run(
        [sys.executable, "-m", "posetune", "search", str(space), "--resume"], cwd=REPO, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "no search to resume" in missing.stderr
    assert not ray_processes()


def test_no_ray_process_is_left_running():
    time.sleep(1)
    assert not ray_processes()
    assert os.environ.get("RAY_ADDRESS") is None
