"""The search driver as a user runs it: killed, interrupted, resumed. Each command starts its
own local Ray instance (none may be running when this module starts)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import REPO, FaultyGCS, kill_ray_leftovers, ray_processes, read_results, tiny_space, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


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


def posetune_search(*args: str) -> subprocess.CompletedProcess:
    """`posetune search ARGS` run to its end (the refused ones end before starting Ray)."""
    command = [sys.executable, "-m", "posetune", "search", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_sigkill_then_resume_skips_finished_trials(synth_small, tmp_path):
    # grace = budget: ASHA stops nothing, so every trial runs long enough to be caught running.
    space = tiny_space(
        tmp_path,
        synth_small,
        name="k",
        search__num_samples=2,
        search__asha={"max_samples": 384, "grace_samples": 384, "reduction_factor": 2},
        search__points_to_evaluate=[{"optimizer.lr": 3e-3, "train.beta_loss": 1.0}],
        overrides={"val.eval_every_samples": 96},  # an evaluation per epoch, not only at the budget
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
    # A kill while a finished trial's close was still queued leaves its run RUNNING; whether the
    # kill comes then is up to the scheduler, so the store is put in that state here.
    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    child_of = json.loads((tmp_path / "runs" / "k" / "tracking.json").read_text())["trials"]
    for trial in finished:
        client.update_run(child_of[trial], status="RUNNING")
        client.set_tag(child_of[trial], "posetune.status", "running")

    resumed = subprocess.run(
        [sys.executable, "-m", "posetune", "search", str(space), "--resume"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = {r["id"]: r for r in read_results(tmp_path, "k")}
    assert len(after) == 2 and all(r["status"] in ("completed", "stopped_early") for r in after.values())
    for trial in finished:  # not re-run
        assert after[trial] == before[trial]
        assert f"trial {trial} started" not in resumed.stderr  # progress lines go to stderr
    # The interrupted trial continued from its checkpoint: its first result after the resume
    # is past what it had reached, not a fresh first epoch.
    first = next(line for line in resumed.stderr.splitlines() if f"trial {interrupted} " in line and "samples" in line)
    samples = int(first.split("samples")[0].split()[-1].replace(",", ""))
    assert samples > 96, first
    assert "2 trials in" in resumed.stdout
    # posetune.worker_logging keeps Ray Train's routine end-of-trial clean-up out of the output.
    assert "Cleaning up placement group" not in resumed.stdout + resumed.stderr

    # MLflow: one parent, exactly one child per trial; the interrupted trial continued its run.
    runs = client.search_runs([client.get_experiment_by_name("k").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("posetune.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["posetune.trial_id"] for r in children) == sorted(after)
    (continued,) = [r for r in children if r.data.tags["posetune.trial_id"] == interrupted]
    steps = [m.step for m in client.get_metric_history(continued.info.run_id, "pose_error")]
    # Calls still queued in the killed driver are lost; nothing is logged twice.
    assert steps == sorted(set(steps)) and steps[-1] == 384 and len(steps) >= 3, steps
    assert continued.data.tags["posetune.status"] == "completed" and parent.info.status == "FINISHED"
    for child in children:  # the finished trials' runs were ended by the resume, from results.json
        trial = child.data.tags["posetune.trial_id"]
        assert child.info.status == "FINISHED" and child.data.tags["posetune.status"] == after[trial]["status"]
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "pose_error")]
        assert steps == sorted(set(steps)) and steps[-1] == after[trial]["samples_seen"], (trial, steps)


@pytest.fixture(scope="module")
def interrupted(synth_small, tmp_path_factory):
    """A search stopped by Ctrl-C after its first result: what the driver printed, and its
    folder, which the refusal tests below must leave as it is."""
    assert not ray_processes(), "a Ray instance is already running; these tests start their own"
    tmp_path = tmp_path_factory.mktemp("interrupted")
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
    wait_for(lambda: not ray_processes(), 60, "Ray processes to exit after Ctrl-C")
    err = (tmp_path / "stderr.txt").read_text()
    return SimpleNamespace(space=space, folder=tmp_path / "runs" / "c", returncode=driver.returncode, err=err)


def test_ctrl_c_prints_how_to_resume(interrupted):
    assert interrupted.returncode == 130, interrupted.err[-3000:]
    assert f"posetune search {interrupted.space} --resume --name c" in interrupted.err
    assert "Traceback" not in interrupted.err


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_new_search_over_an_existing_one_is_refused(interrupted):
    before = snapshot(interrupted.folder)
    again = posetune_search(str(interrupted.space), "--name", "c")
    assert again.returncode == 2, again.stderr[-3000:]
    assert f"{interrupted.folder} already holds a search; continue it with --resume" in again.stderr
    assert snapshot(interrupted.folder) == before and not ray_processes()


@pytest.mark.parametrize(
    "change",
    ["search.num_samples=3", "optimizer.weight_decay=0.01"],
    ids=["search-space", "base-config"],
)
def test_resume_with_a_changed_space_or_base_config_is_refused(interrupted, change):
    before = snapshot(interrupted.folder)
    resumed = posetune_search(str(interrupted.space), "--resume", "--name", "c", change)
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    assert f"the search space or base config changed since {interrupted.folder} was started" in resumed.stderr
    assert snapshot(interrupted.folder) == before and not ray_processes()


def test_no_ray_process_is_left_running():
    time.sleep(1)
    assert not ray_processes()
    assert os.environ.get("RAY_ADDRESS") is None


def test_search_in_a_bucket_resumes_from_a_fresh_machine(gcs, bucket, synth_small, tmp_path):
    """Everything lives in the bucket: after SIGKILL the search resumes from another working
    directory with an empty cache (a new head node), and its results, best config and best
    checkpoint are read from anywhere."""
    from posetune import storage
    from posetune.data.tools import push_dataset

    push_dataset(str(synth_small), f"gs://{bucket}/data")
    searches = f"gs://{bucket}/searches"
    space = tiny_space(
        tmp_path,
        synth_small,
        name="g",
        search__num_samples=1,
        search__asha={"max_samples": 384, "grace_samples": 384, "reduction_factor": 2},
        search__points_to_evaluate=[],
        storage__path=searches,
        base__overrides={
            "dataset.root": f"gs://{bucket}/data",
            "dataset.image_scale": "64x40",
            "dataset.num_workers": 0,
            "train.batch_size": 16,
            "val.eval_every_samples": 96,  # an evaluation per epoch, not only at the budget
        },
    )

    def records():
        path = f"{searches}/g/results.json"
        return json.loads(storage.read_text(path))["trials"] if storage.exists(path) else []

    first = tmp_path / "first-machine"
    first.mkdir()
    env = {**os.environ, "XDG_CACHE_HOME": str(first / "cache")}
    with open(first / "out.txt", "w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "posetune", "search", str(space)], cwd=first, stdout=out, stderr=out, env=env
        )
    try:
        wait_for(lambda: any(r["samples_seen"] >= 192 for r in records()), 400, "two results in the bucket")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    wait_for(lambda: not ray_processes(), 60, "Ray processes to exit after SIGKILL")
    assert list(first.iterdir()) != [] and not (first / "runs").exists()  # nothing of the search is local

    second = tmp_path / "second-machine"
    second.mkdir()
    env = {**os.environ, "XDG_CACHE_HOME": str(second / "cache")}
    resumed = subprocess.run(
        [sys.executable, "-m", "posetune", "search", str(space), "--resume"],
        cwd=second,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["status"] for r in records()] == ["completed"]
    assert f"best checkpoint: {searches}/g/best/model.pt" in resumed.stdout

    third = tmp_path / "third-machine"
    third.mkdir()
    shown = subprocess.run(
        [sys.executable, "-m", "posetune", "results", "g", f"storage.path={searches}"],
        cwd=third,
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0 and shown.stdout.splitlines()[0].split()[:2] == ["trial", "status"], shown.stderr
    evaluated = subprocess.run(
        [sys.executable, "-m", "posetune", "evaluate", "--checkpoint", f"{searches}/g/best/model.pt"],
        cwd=third,
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_CACHE_HOME": str(third / "cache")},
    )
    assert evaluated.returncode == 0 and "val split: 32 samples" in evaluated.stdout, evaluated.stderr
    assert sorted(p.name for p in third.iterdir()) == ["cache"]  # only the fetched dataset


def checkpoint_folder(name: str) -> str | None:
    """The Ray Train checkpoint folder an object name lies in, or None."""
    import re

    folder = re.search(r"(?:^|/)(checkpoint_[^/]+)/", name)
    return folder.group(1) if folder else None


def test_a_worker_killed_while_its_checkpoint_uploads_resumes_from_the_last_complete_one(
    gcs, bucket, synth_small, tmp_path
):
    """Reports upload checkpoints in the background (Ray Train's asynchronous mode). The
    bucket's front holds every upload after the first checkpoint's, so training runs on past
    reports whose checkpoints hang half-written; once Ray has registered the first one, the
    Train worker is killed. Ray Train restarts it from that checkpoint, complete in the
    bucket, and the reports cut off reach neither Tune nor ASHA: they are trained again."""
    import io
    import urllib.parse

    import psutil
    import torch

    from posetune.data.tools import push_dataset
    from posetune.search.trial import SCRATCH_PREFIX

    push_dataset(str(synth_small), f"gs://{bucket}/data")
    space = tiny_space(
        tmp_path,
        synth_small,
        name="a",
        search__num_samples=1,
        search__asha={"max_samples": 384, "grace_samples": 384, "reduction_factor": 2},
        search__points_to_evaluate=[],
        storage__path=f"gs://{bucket}/searches",
        base__overrides={
            "dataset.root": f"gs://{bucket}/data",
            "dataset.image_scale": "64x40",
            "dataset.num_workers": 0,
            "train.batch_size": 16,
            "val.eval_every_samples": 96,
        },
    )
    front = FaultyGCS(gcs.host)
    folders: list[str] = []  # checkpoint folders in the order their uploads began

    def after_the_first_checkpoint(method: str, path: str) -> bool:
        name = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query).get("name", [""])[0]
        folder = checkpoint_folder(name) if method == "POST" else None
        if folder and folder not in folders:
            folders.append(folder)
        return folder is not None and folder != folders[0]

    def registered(folder: str) -> bool:
        """Ray Train's checkpoint manager lists the folder in its snapshot in the bucket."""
        snapshots = [
            n for n in gcs.names(bucket, "searches/a/train/") if n.endswith("checkpoint_manager_snapshot.json")
        ]
        return any(folder in gcs.client.bucket(bucket).blob(n).download_as_text() for n in snapshots)

    front.hold = after_the_first_checkpoint
    env = {**os.environ, "STORAGE_EMULATOR_HOST": front.host, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    with open(tmp_path / "out.txt", "w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "posetune", "search", str(space)], cwd=tmp_path, stdout=out, stderr=out, env=env
        )
    try:
        wait_for(lambda: front.held or driver.poll() is not None, 400, "the second checkpoint's upload")
        wait_for(lambda: registered(folders[0]) or driver.poll() is not None, 120, "the first checkpoint registered")
        assert driver.poll() is None, (tmp_path / "out.txt").read_text()[-3000:]
        (worker,) = [
            p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])
        ]
        # Training went on: the reports at 192, 288 and 384 samples were all made while the
        # first of them was still uploading (each waits in its snapshot folder for its turn).
        waiting = Path(tempfile.gettempdir()), f"{SCRATCH_PREFIX}{worker.pid}-report-*"
        wait_for(lambda: len(list(waiting[0].glob(waiting[1]))) == 3, 120, "three reports waiting to upload")
        worker.kill()
        front.hold = None
        front.release.set()
        assert driver.wait(timeout=600) == 0, (tmp_path / "out.txt").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
        front.close()
    cut_off = {checkpoint_folder(urllib.parse.unquote(path)) for path in front.held}

    def read(name: str) -> bytes:
        return gcs.client.bucket(bucket).blob(name).download_as_bytes()

    (record,) = json.loads(read("searches/a/results.json"))["trials"]
    assert (record["status"], record["samples_seen"]) == ("completed", 384)
    (rows_name,) = [n for n in gcs.names(bucket, "searches/a/tune/") if n.endswith("/result.json")]
    rows = [json.loads(line) for line in read(rows_name).decode().splitlines()]
    # 96 once: the new worker resumed from the first checkpoint, not from the start.
    assert [r["samples_seen"] for r in rows] == [96, 192, 288, 384]
    assert rows[0]["workers_started_at"] < rows[1]["workers_started_at"]  # a new worker group

    names = gcs.names(bucket, f"searches/a/train/{record['id']}/")
    kept = {checkpoint_folder(n) for n in names} - {None}
    assert len(kept) == 2 and not kept & cut_off  # keep_checkpoints; none of the half-written ones

    def load(folder: str, file: str) -> dict:
        data = read(f"searches/a/train/{record['id']}/{folder}/{file}")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)

    assert sorted(load(folder, "last.pt")["samples_seen"] for folder in kept) == [288, 384]
    assert all(load(folder, "best.pt")["model"] for folder in kept)
    assert gcs.names(bucket, "searches/a/best/model.pt") == ["searches/a/best/model.pt"]


FLAT_LAYOUT_COMMIT = "7b443b200d278d24b9e661bcc54eb22c08e5fbc1"  # the last commit of the flat package


def flat_layout_code(into) -> None:
    """posetune as it was before the subpackages, from this checkout's history."""
    listed = subprocess.run(["git", "cat-file", "-e", FLAT_LAYOUT_COMMIT], cwd=REPO, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("needs the git history of posetune (a clone, not an exported tree)")
    archive = subprocess.run(["git", "archive", FLAT_LAYOUT_COMMIT, "posetune"], cwd=REPO, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)


def test_a_search_started_with_the_flat_layout_resumes(synth_small, tmp_path):
    """Tune pickled the old module paths (posetune.searchers, posetune.space, ...) into the
    experiment; the new layout restores it and finishes the search."""
    old = tmp_path / "flat-layout"
    old.mkdir()
    flat_layout_code(old)
    space = tiny_space(
        tmp_path,
        synth_small,
        name="f",
        search__num_samples=1,
        search__asha={"max_samples": 288, "grace_samples": 288, "reduction_factor": 2},
        overrides={"val.eval_every_samples": 96},
    )
    # The old package first on the path of the driver and of every Ray worker it starts.
    env = {**os.environ, "PYTHONPATH": str(old)}
    with open(tmp_path / "old.txt", "w") as out:
        command = [sys.executable, "-m", "posetune", "search", str(space)]
        driver = subprocess.Popen(command, cwd=old, stdout=out, stderr=out, env=env)
    try:
        wait_for(lambda: any(r["samples_seen"] >= 192 for r in read_results(tmp_path, "f")), 400, "two results")
    finally:
        driver.send_signal(signal.SIGINT)
        driver.wait(timeout=180)
    assert driver.returncode == 130, (tmp_path / "old.txt").read_text()[-3000:]
    tune_folder = tmp_path / "runs" / "f" / "tune"
    pickled = b"".join(p.read_bytes() for p in tune_folder.iterdir() if p.suffix == ".pkl")
    assert b"posetune.searchers" in pickled and b"posetune.search.searchers" not in pickled
    wait_for(lambda: not ray_processes(), 60, "Ray processes to exit")

    resumed = posetune_search(str(space), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["status"] for r in read_results(tmp_path, "f")] == ["completed"]
    assert "Traceback" not in resumed.stderr


def pending_in_tunes_state(tune_folder: Path, trial_id: str) -> None:
    """Set a trial back to PENDING in Tune's latest experiment state (a JSON file whose
    trial_data rows hold each trial's own state as a JSON string, as Tune 2.60 writes it). It
    may be unfinished there already: Tune's last snapshot can predate the failure."""
    path = sorted(tune_folder.glob("experiment_state-*.json"))[-1]
    state = json.loads(path.read_text())
    for row in state["trial_data"]:
        trial = json.loads(row[0])
        if trial["trial_id"] == trial_id:
            assert trial["status"] in ("ERROR", "RUNNING", "PENDING"), trial["status"]
            trial["status"] = "PENDING"
            row[0] = json.dumps(trial)
    path.write_text(json.dumps(state))


def test_retry_failed_reruns_the_failed_trials_within_the_concurrency_limit_and_tells_optuna(synth_small, tmp_path):
    """A search started by --resume with none saved yet, whose every trial fails (its checkpoint
    folder cannot be made). Fixed, a resume keeps them failed,
    even one that Tune's saved state has as unfinished; --retry-failed runs them again: Tune
    restarts both at once, and with room for two they still train one at a time
    (search.max_concurrent_trials = 1), each ends completed, and Optuna learns both outcomes."""
    from posetune.search.run import load_study

    space = tiny_space(
        tmp_path,
        synth_small,
        name="r",
        search__num_samples=2,
        search__points_to_evaluate=[],
        search__asha={"max_samples": 96, "grace_samples": 96, "reduction_factor": 2},
    )
    blocker = tmp_path / "runs" / "r" / "train"  # a file where Ray Train makes its trial folders
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder\n")
    # --resume before any search exists (a retried RayJob does that) starts the search.
    failed = posetune_search(str(space), "--resume")
    assert "no search to resume at" in failed.stderr and "starting it" in failed.stderr, failed.stderr[-3000:]
    before = read_results(tmp_path, "r")
    assert [r["status"] for r in before] == ["failed", "failed"], failed.stderr[-3000:]
    blocker.unlink()

    # What a kill between a failure and Tune's next snapshot leaves: results.json says failed,
    # Tune's saved state still has the trial pending. Without --retry-failed, Tune restarts it
    # and it fails again at once with its recorded error, training nothing.
    pending_in_tunes_state(tmp_path / "runs" / "r" / "tune", before[0]["id"])
    kept = posetune_search(str(space), "--resume")
    assert read_results(tmp_path, "r") == before, kept.stderr[-3000:]
    assert not (tmp_path / "runs" / "r" / "train").exists()  # no trial trained (made its folder)

    retried = posetune_search(str(space), "--resume", "--retry-failed")
    assert retried.returncode == 0, retried.stderr[-3000:]
    records = read_results(tmp_path, "r")
    assert [r["status"] for r in records] == ["completed", "completed"], records
    # Each trial's training, from its workers' start to its last report, as Tune recorded it.
    spans = []
    for trial_dir in (tmp_path / "runs" / "r" / "tune").glob("trial-*"):
        rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
        spans.append((rows[0]["workers_started_at"], rows[-1]["timestamp"]))
    (first, second) = sorted(spans)
    assert first[1] <= second[0] + 1, f"two trials trained at once: {spans}"  # timestamp is in whole seconds
    study = load_study(str(tmp_path / "runs" / "r"))
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"], states
    fails = sorted(str(t.params) for t in study.trials if t.state.name == "FAIL")
    assert fails == sorted(str(t.params) for t in study.trials if t.state.name == "COMPLETE")
