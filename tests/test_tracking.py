"""MLflow tracking against a real `mlflow server` on 127.0.0.1 (SQLite backend, artifacts
proxied by the server), queried through MlflowClient."""

from __future__ import annotations

import errno
import json
import logging
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from posetune import cli
from posetune.errors import PosetuneError
from posetune.tracking.store import AsyncLogger, check_tracking_uri, resolve_tracking_uri

from helpers import REPO, MlflowServer, free_port, read_results, tiny_space, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def client_for(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def runs_of(uri: str, experiment: str):
    client = client_for(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("posetune.kind") == "search"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return client, parents[0], children


def test_search_logs_one_parent_and_one_child_per_trial(ray_cluster, server, synth_small, tmp_path, capsys):
    space = tiny_space(tmp_path, synth_small, search__num_samples=2)  # the two initial points
    assert cli.main(["search", str(space), f"tracking.tracking_uri={server.uri}"]) == 0
    out = capsys.readouterr().out
    assert f"MLflow: everything was logged to {server.uri}" in out

    records = {r["id"]: r for r in read_results(tmp_path)}
    client, parent, children = runs_of(server.uri, "t")
    assert sorted(r.data.tags["posetune.trial_id"] for r in children) == sorted(records)
    for child in children:
        record = records[child.data.tags["posetune.trial_id"]]
        assert child.data.tags["posetune.status"] == record["status"]
        assert child.info.status == "FINISHED"
        assert float(child.data.params["optimizer.lr"]) == pytest.approx(record["params"]["optimizer.lr"])
        assert child.data.params["dataset.image_scale"] == "64x40"  # every resolved key, flattened
        history = client.get_metric_history(child.info.run_id, "pose_error")
        steps = [m.step for m in history]
        assert steps == sorted(steps) and steps[0] == 96 and steps[-1] == record["samples_seen"]
        assert history[-1].value == pytest.approx(record["metrics"]["pose_error"])
        assert [a.path for a in client.list_artifacts(child.info.run_id, "checkpoints")] == ["checkpoints/best.pt"]
    # The logged checkpoint, like the trial's best.pt, is the weights and config (evaluate and
    # predict need no more), not the optimizer and RNG states that only resuming reads (last.pt).
    logged = Path(client.download_artifacts(children[0].info.run_id, "checkpoints/best.pt", str(tmp_path)))
    trial = Path(records[children[0].data.tags["posetune.trial_id"]]["checkpoint"])
    full = trial / "last.pt"
    assert logged.stat().st_size < 0.5 * full.stat().st_size, (logged.stat().st_size, full.stat().st_size)
    from posetune.train.checkpoint import load_checkpoint
    from posetune.train.inference import model_from_checkpoint

    assert "optimizer" not in load_checkpoint(logged) and model_from_checkpoint(logged)[1].dataset.image_scale
    assert "optimizer" not in load_checkpoint(trial / "best.pt") and "optimizer" in load_checkpoint(full)

    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.json", "summary.txt", "plots", "search_space"} <= parent_artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/learning_curves.png", "plots/parallel_coordinate.html"} <= plots
    best = min(records.values(), key=lambda r: r["best_metrics"]["pose_error"])
    assert parent.data.metrics["pose_error"] == pytest.approx(best["best_metrics"]["pose_error"])
    assert parent.data.tags["posetune.best_trial"] == best["id"]
    assert parent.data.params["search.num_samples"] == "2" and "posetune.git_commit" in parent.data.tags
    assert parent.data.metrics["cpu_hours"] > 0 and "cost" not in parent.data.metrics  # no prices given

    # The best model is registered, loads with mlflow.pytorch and predicts through the CLI.
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(server.uri)
    model = mlflow.pytorch.load_model("models:/posetune-t/latest")
    translation, _ = model(torch.rand(1, 3, 40, 64))
    assert translation.shape == (1, 3) and model.posetune_config["dataset"]["image_scale"] == "64x40"
    image = sorted((synth_small / "val").glob("RGB*/rgb_3.png"))[0]
    assert cli.main(["predict", "--model", "models:/posetune-t/latest", "--tracking-uri", server.uri, str(image)]) == 0
    prediction = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(prediction["translation"]) == 3 and len(prediction["quaternion"]) == 4


def test_server_killed_mid_search_then_back(ray_cluster, server, synth_small, tmp_path, capsys, caplog):
    space = tiny_space(
        tmp_path,
        synth_small,
        name="outage",
        search__num_samples=1,
        search__asha={"max_samples": 480, "grace_samples": 480, "reduction_factor": 2},
        overrides={"val.eval_every_samples": 96},  # an evaluation per epoch, not only at the budget
    )
    events = []

    def outage():
        wait_for(
            lambda: any(r["samples_seen"] >= 192 for r in read_results(tmp_path, "outage")),
            300,
            "a trial with two evaluations",
        )
        server.stop()
        events.append("stopped")
        time.sleep(20)  # evaluations keep coming while the server is away
        server.start()
        events.append("restarted")

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    caplog.set_level(logging.INFO, logger="posetune")
    assert cli.main(["search", str(space), f"tracking.tracking_uri={server.uri}"]) == 0
    thread.join(timeout=120)
    logged = " ".join(record.getMessage() for record in caplog.records)  # the CLI's stderr
    assert events == ["stopped", "restarted"]
    assert "MLflow unavailable" in logged and "MLflow reachable again; catching up" in logged
    assert "everything was logged" in capsys.readouterr().out  # the summary is honest: it all caught up

    records = {r["id"]: r for r in read_results(tmp_path, "outage")}
    client, _, children = runs_of(server.uri, "outage")
    assert len(children) == len(records) == 1
    for child in children:  # no evaluation was lost in the outage
        history = client.get_metric_history(child.info.run_id, "pose_error")
        assert [m.step for m in history] == [96, 192, 288, 384, 480]


def test_uploads_the_server_refuses_are_errors_of_the_search(
    ray_cluster, server, synth_small, tmp_path, capsys, monkeypatch
):
    """A real server that answers 500 to every upload once the search runs: the trial's best
    checkpoint and the best model's registration are listed in summary.txt and in the printed
    summary, the exit code is 1, and the trial's run still ends."""
    monkeypatch.setattr("posetune.tracking.store.BRIEF_RETRY_S", 1.0)  # the default retries 30 s per upload
    space = tiny_space(
        tmp_path,
        synth_small,
        name="refused",
        search__num_samples=1,
        search__points_to_evaluate=[{"optimizer.lr": 3e-3, "train.beta_loss": 1.0}],
        search__asha={"max_samples": 192, "grace_samples": 192, "reduction_factor": 2},
    )

    def refuse_once_the_trial_starts():  # the parent run's own artifacts are in by then
        wait_for(lambda: read_results(tmp_path, "refused"), 300, "the trial to start")
        server.refuse_uploads()

    thread = threading.Thread(target=refuse_once_the_trial_starts, daemon=True)
    thread.start()
    assert cli.main(["search", str(space), f"tracking.tracking_uri={server.uri}"]) == 1
    thread.join(timeout=10)
    out = capsys.readouterr().out
    summary = (tmp_path / "runs" / "refused" / "summary.txt").read_text()
    (record,) = read_results(tmp_path, "refused")
    for what in (
        f"error: MLflow did not receive the best checkpoint of trial {record['id']}: ",
        "error: MLflow did not receive the best model, registered as 'posetune-refused': ",
    ):
        assert what in summary and what in out, summary
    assert "500 error responses" in summary and "everything was logged" not in out
    client, _, (child,) = runs_of(server.uri, "refused")
    assert child.info.status == "FINISHED" and child.data.tags["posetune.status"] == "completed"
    assert not client.list_artifacts(child.info.run_id, "checkpoints")
    assert not client.search_registered_models()


def test_unreachable_server_fails_before_training(synth_small, tmp_path, capsys):
    space = tiny_space(tmp_path, synth_small)
    uri = f"http://127.0.0.1:{free_port()}"
    assert cli.main(["search", str(space), f"tracking.tracking_uri={uri}"]) == 2
    err = capsys.readouterr().err
    assert f"MLflow tracking server {uri} is not reachable" in err and "tracking.enabled=false" in err
    assert not (tmp_path / "runs" / "t").exists()  # no experiment folder: nothing started
    assert (
        cli.main(
            [
                "train",
                f"dataset.root={synth_small}",
                f"tracking.tracking_uri={uri}",
                f"system.out_dir={tmp_path / 'run'}",
            ]
        )
        == 2
    )
    assert not (tmp_path / "run").exists()


def test_train_logs_one_run_to_the_embedded_store_without_a_server(synth_small, tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "MLFLOW_TRACKING_URI"}
    command = [
        sys.executable,
        "-m",
        "posetune",
        "train",
        "--config",
        str(REPO / "configs" / "quick.yaml"),
        f"dataset.root={synth_small}",
        "train.epochs=2",
        "val.eval_freq=1",
        "dataset.image_scale=64x40",
        "system.out_dir=runs/one",
    ]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    store = tmp_path / "runs" / "mlflow.db"
    assert store.exists()
    client = client_for(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("posetune").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["posetune.status"] == "completed"
    assert run.data.params["train.epochs"] == "2" and run.info.run_name == "one"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "pose_error")] == [96, 192]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"checkpoints", "config.yaml", "metrics.json"}


@pytest.mark.server
def test_ui_serves_the_embedded_store(synth_small, tmp_path):
    (tmp_path / "runs").mkdir()
    from posetune.tracking.store import embedded_store, experiment_id_for

    uri, _ = embedded_store(tmp_path / "runs")
    experiment_id_for(client_for(uri), "posetune", uri)
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "posetune", "ui", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        wait_for(lambda: MlflowServer.healthy(type("S", (), {"uri": f"http://127.0.0.1:{port}"})), 120, "the UI")
        first_lines = [ui.stdout.readline() for _ in range(2)]
        assert first_lines[0].startswith(f"MLflow UI on the embedded store: http://127.0.0.1:{port}")
        assert f"http://127.0.0.1:{port}/#/experiments/" in first_lines[1] and "/runs" in first_lines[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10") as r:
            names = [e["name"] for e in json.loads(r.read())["experiments"]]
        assert "posetune" in names
        server_processes = psutil.Process(ui.pid).children(recursive=True)  # mlflow, uvicorn, job runners
        assert server_processes
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    assert ui.returncode == 0
    _, alive = psutil.wait_procs(server_processes, timeout=30)
    assert not alive, f"`posetune ui` left its server running: {[p.cmdline() for p in alive]}"


def test_tracking_uri_priority(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert resolve_tracking_uri("http://explicit:5000") == "http://explicit:5000"
    assert resolve_tracking_uri(None) == "http://from-env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    with pytest.raises(PosetuneError, match="no longer accepts file stores"):
        check_tracking_uri("file:///tmp/mlruns")


def test_async_logger_retries_outages_and_reports_what_it_dropped(caplog):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection refused")

    def rejected():
        raise ValueError("INVALID_PARAMETER_VALUE: bad metric")

    def never():
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    caplog.set_level(logging.INFO, logger="posetune")
    logger = AsyncLogger(max_backoff_s=0.05)
    logger.submit("flaky call", flaky)
    logger.submit("rejected call", rejected)
    logger.submit("call during a long outage", never)
    logger.submit("queued behind it", never)  # the outage lasts: tried once more, then reported
    logger.submit("fine once the outage is over", lambda: calls.append("ok"))
    start = time.monotonic()
    failed = logger.close(timeout_s=2)
    assert time.monotonic() - start < 10  # closing gives up instead of waiting for the server
    assert calls[:3] == [1, 1, 1] and calls[-1] == "ok"  # retried until it went through
    assert failed[0] == "rejected call: INVALID_PARAMETER_VALUE: bad metric"  # not retried
    assert any(f.startswith("call during a long outage") for f in failed)
    assert any(f.startswith("queued behind it") for f in failed)
    assert any("retrying in the background" in record.getMessage() for record in caplog.records)


# --- Runs close themselves (a real SQLite store, no Ray) ----------------------------------------


def _evaluation(samples: int):
    from types import SimpleNamespace

    return SimpleNamespace(
        metrics={"pose_error": 1.0 / samples}, train_loss=0.5, train_images_per_s=9.0, samples_seen=samples
    )


def _train_run(tmp_path, name: str):
    from posetune.config import Config
    from posetune.tracking.runs import TrainRun

    cfg = Config()
    cfg.tracking.tracking_uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    out_dir = tmp_path / name
    out_dir.mkdir()
    return TrainRun(cfg, out_dir), cfg.tracking.tracking_uri


@pytest.mark.parametrize(
    ("error", "status", "outcome"),
    [
        (None, "FINISHED", "completed"),
        (KeyboardInterrupt(), "KILLED", "interrupted"),
        ("diverged", "FAILED", "diverged"),
        (RuntimeError("CUDA out of memory"), "FAILED", "failed"),
    ],
)
def test_a_training_run_closes_itself(tmp_path, error, status, outcome):
    from posetune.errors import TrainingDiverged

    error = TrainingDiverged("loss is nan", 96) if error == "diverged" else error
    run, uri = _train_run(tmp_path, "run")
    try:
        with run:
            run.on_evaluation(_evaluation(96))
            if error is not None:
                raise error
    except (KeyboardInterrupt, Exception) as caught:
        assert caught is error
    (logged,) = client_for(uri).search_runs([client_for(uri).get_experiment_by_name("posetune").experiment_id])
    assert logged.info.status == status and logged.data.tags["posetune.status"] == outcome
    assert logged.data.metrics["pose_error"] == pytest.approx(1 / 96) and not run.unlogged


def test_a_user_error_before_training_logs_nothing(tmp_path):
    from posetune.errors import DataError

    run, _ = _train_run(tmp_path, "run")
    with pytest.raises(DataError), run:
        raise DataError("dataset.root = '/nope' does not exist")
    assert not (tmp_path / "store").exists()  # not even an empty store


def test_a_search_run_is_a_listener_that_closes_its_parent(tmp_path):
    """The search's events, sent by hand: a parent, one child per trial, and the parent FAILED
    when the search raises after it started."""
    from posetune.config import Config, TrackingConfig
    from posetune.search.events import Outcome, SearchStarted, TrialEnded, TrialReported, TrialStarted
    from posetune.tracking.runs import SearchRun

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space_file = tmp_path / "space.yaml"
    space_file.write_text("search: {}\n")
    run = SearchRun(TrackingConfig(tracking_uri=uri), "s", str(tmp_path / "s"), str(space_file), {"search.x": 1})
    (tmp_path / "s").mkdir()
    config = Config()  # the trial's whole config: its child run's params
    config.optimizer.lr = 0.01
    with pytest.raises(RuntimeError, match="the cluster went away"), run:
        run.on_event(SearchStarted(str(tmp_path / "s"), resume=False))
        run.on_event(TrialStarted("t1", {"optimizer.lr": 0.01}, config))
        run.on_event(TrialReported("t1", {"optimizer.lr": 0.01}, 96, {"pose_error": 0.5, "train_loss": 1.0}, None))
        run.on_event(TrialEnded("t1", {"optimizer.lr": 0.01}, Outcome.STOPPED_EARLY, 96, None, None, {"CPU": 0.1}))
        raise RuntimeError("the cluster went away")
    _, parent, children = runs_of(uri, "s")
    assert parent.info.status == "FAILED" and parent.data.params["search.x"] == "1"
    (child,) = children
    assert child.info.status == "FINISHED" and child.data.tags["posetune.status"] == "stopped_early"
    assert child.data.params["optimizer.lr"] == "0.01" and child.data.metrics["train_loss"] == 1.0
    state = json.loads((tmp_path / "s" / "tracking.json").read_text())
    assert state["trials"] == {"t1": child.info.run_id} and state["parent_run_id"] == parent.info.run_id


def _summary(folder: Path, records: list):
    """The summary a search ends with, over `records`, with the files its parent run logs."""
    from posetune.search.results import Compute, SearchSummary, count

    for name in ("results.json", "summary.txt"):
        (folder / name).write_text("{}\n")
    return SearchSummary(
        str(folder),
        records,
        count(records),
        1.0,
        "pose_error",
        "min",
        None,
        None,
        None,
        False,
        "local",
        Compute({}, None),
    )


def test_a_resumed_search_ends_runs_whose_close_was_lost_and_logs_no_point_twice(tmp_path):
    """A driver killed while trial t1's close was queued (results.json: completed; its run:
    RUNNING), then resumed: Tune sends no event for t1, and restores t2 from its checkpoint at
    192 samples, which it reports again. The resume ends t1's run from results.json, and no
    metric has two points at one step."""
    from posetune.config import Config, TrackingConfig
    from posetune.search.events import Outcome, SearchEnded, SearchStarted, TrialEnded, TrialReported, TrialStarted
    from posetune.search.results import TrialRecord
    from posetune.tracking.runs import SearchRun

    uri, folder, space_file = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "s", tmp_path / "space.yaml"
    folder.mkdir()
    space_file.write_text("search: {}\n")

    def search_run():
        return SearchRun(TrackingConfig(tracking_uri=uri), "s", str(folder), str(space_file), {})

    def report(run, trial, samples):
        run.on_event(TrialReported(trial, {}, samples, {"pose_error": 1000 / samples, "train_loss": 1.0}, None))

    killed = search_run()
    killed.on_event(SearchStarted(str(folder), resume=False))
    for trial in ("t1", "t2"):
        killed.on_event(TrialStarted(trial, {}, Config()))
    for samples in (96, 192):
        report(killed, "t1", samples)
        report(killed, "t2", samples)
    killed.logger.close(timeout_s=60)  # what had reached MLflow when the driver was killed: not t1's end

    resumed = search_run()
    with resumed:
        resumed.on_event(SearchStarted(str(folder), resume=True))
        resumed.on_event(TrialStarted("t2", {}, Config()))
        for samples in (192, 288):  # restored at 192: that evaluation again, then the next one
            report(resumed, "t2", samples)
        resumed.on_event(TrialEnded("t2", {}, Outcome.COMPLETED, 288, None, None, {}))
        t1 = TrialRecord("t1", {}, Outcome.COMPLETED, {"pose_error": 1000 / 192}, 192, {"pose_error": 1000 / 192})
        t2 = TrialRecord("t2", {}, Outcome.COMPLETED, {"pose_error": 1000 / 288}, 288, {"pose_error": 1000 / 288})
        resumed.on_event(SearchEnded(_summary(folder, [t2, t1]), None))
    assert not resumed.unlogged, resumed.unlogged
    client, parent, children = runs_of(uri, "s")
    runs = {child.data.tags["posetune.trial_id"]: child for child in children}
    assert sorted(runs) == ["t1", "t2"] and parent.info.status == "FINISHED"
    for trial, steps in (("t1", [96, 192]), ("t2", [96, 192, 288])):
        assert runs[trial].info.status == "FINISHED" and runs[trial].data.tags["posetune.status"] == "completed"
        for key in ("pose_error", "train_loss"):
            assert [m.step for m in client.get_metric_history(runs[trial].info.run_id, key)] == steps, (trial, key)


def _raised(call) -> BaseException:
    try:
        call()
    except BaseException as exc:  # the error the real operation raises
        return exc
    raise AssertionError("it did not fail")


def test_failures_are_classified_by_whether_trying_again_can_help(tmp_path):
    """Real errors of real operations: a local file that is missing, a path through a file, a
    full disk or a refused permission fail the same way again (reported at once); a server that
    cannot be reached is an outage (retried until it returns)."""
    import socket

    import requests

    from posetune.tracking.store import BRIEF, OUTAGE, PERMANENT, failure_kind, mlflow_client

    (tmp_path / "file").write_text("")
    closed = f"127.0.0.1:{free_port()}"
    permanent = {
        "missing file": _raised(lambda: (tmp_path / "nope.pt").read_bytes()),
        "path through a file": _raised(lambda: (tmp_path / "file" / "x").write_text("")),
        # A full disk and a refused permission cannot be made here (root ignores permissions).
        "disk full": OSError(errno.ENOSPC, "No space left on device"),
        "permission": PermissionError(errno.EACCES, "Permission denied"),
        "rejected value": _raised(lambda: mlflow_client(f"sqlite:///{tmp_path / 'm.db'}").get_run("no-such-run")),
    }
    outage = {
        "refused connection": _raised(lambda: socket.create_connection(closed.split(":"), timeout=5)),
        "requests' refused connection": _raised(lambda: requests.get(f"http://{closed}/", timeout=5)),
        "MLflow's refused connection": _raised(lambda: mlflow_client(f"http://{closed}").get_experiment("0")),
    }
    for name, exc in permanent.items():
        assert failure_kind(exc) == PERMANENT, (name, exc)
    for name, exc in outage.items():
        assert failure_kind(exc) == OUTAGE, (name, exc)
    assert failure_kind(OSError("something else")) == BRIEF  # unknown: retried a while, not for ever


def test_a_permanent_failure_does_not_hold_up_the_queue():
    """A checkpoint file that is gone fails at once; the calls behind it go through without
    waiting for the logger to close (every OSError used to be retried until then)."""
    done = threading.Event()
    logger = AsyncLogger()
    logger.submit("a checkpoint that was removed", lambda: Path("/nonexistent/best.pt").read_bytes())
    logger.submit("the next call", done.set)
    assert done.wait(timeout=5), "the next call waited behind a failure that cannot go away"
    failed = logger.close(timeout_s=5)
    assert failed == ["a checkpoint that was removed: [Errno 2] No such file or directory: '/nonexistent/best.pt'"]


def test_an_error_the_server_keeps_answering_is_retried_for_a_while_then_reported():
    """A 500 is retried (an overloaded server recovers), for BRIEF_RETRY_S at most: an artifact
    root that cannot be written never recovers, and everything queued waits behind it."""
    tries = []

    def refused():
        tries.append(time.monotonic())
        raise RuntimeError("API request to /ajax-api failed with error code 500 != 200")

    logger = AsyncLogger(brief_retry_s=2.5)
    logger.submit("an upload", refused)
    logger.submit("the next call", lambda: tries.append("next"))
    wait_for(lambda: "next" in tries, 20, "the call behind the refused one")
    (failed,) = logger.close(timeout_s=5)
    assert failed.startswith("an upload: API request") and "still failing after 3 tries" in failed, failed
    assert tries[-1] == "next" and 2.5 <= tries[-2] - tries[0] < 5
