"""The commands as a user runs them: subprocesses, exit codes, outputs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posetune.train.metrics import METRIC_NAMES

REPO = Path(__file__).resolve().parents[1]
FAST = ["train.epochs=2", "val.eval_freq=1", "train.batch_size=8", "dataset.image_scale=64x40"]


def posetune(*args, cwd=REPO, env=None):
    environment = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "posetune", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment,
        timeout=600,
    )


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("posetune: error: ")
    for fragment in fragments:
        assert fragment in proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """synth -> train through the CLI; shared by the evaluate / predict tests."""
    root = tmp_path_factory.mktemp("cli")
    synth = posetune("data", "synth", root / "data", "--train", 48, "--val", 16, "--test", 8, "--seed", 2)
    assert synth.returncode == 0, synth.stderr
    assert "train: 48 images" in synth.stdout and (root / "data" / "test").is_dir()
    train = posetune(
        "train",
        "--config",
        "configs/quick.yaml",
        f"dataset.root={root / 'data'}",
        f"system.out_dir={root / 'run'}",
        *FAST,
    )
    assert train.returncode == 0, train.stderr
    assert "best evaluation (epoch" in train.stdout and "orientation_error_deg" in train.stdout
    return root


def test_help_lists_every_command():
    proc = posetune("--help")
    assert proc.returncode == 0
    for command in ["train", "evaluate", "predict", "data", "search", "results", "ui", "config", "cluster"]:
        assert command in proc.stdout
    assert posetune("train", "--help").returncode == 0


def test_evaluate_prints_a_table_and_writes_json(trained):
    out = trained / "metrics.json"
    proc = posetune("evaluate", "--checkpoint", trained / "run/checkpoints/best.pt", "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert "val split: 16 samples" in proc.stdout and "translation_error_cm" in proc.stdout
    metrics = json.loads(out.read_text())
    assert list(metrics) == list(METRIC_NAMES)
    test = posetune("evaluate", "--checkpoint", trained / "run/checkpoints/last.pt", "--split", "test")
    assert test.returncode == 0 and "test split: 8 samples" in test.stdout


def test_predict_prints_one_json_line_per_image(trained):
    images = sorted((trained / "data" / "test").glob("RGB*/rgb_*.png"))[:3]
    proc = posetune("predict", "--checkpoint", trained / "run/checkpoints/best.pt", *images)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(p) for p in images]
    for line in lines:
        assert len(line["translation"]) == 3 and 0.5 < line["translation"][2] < 3
        assert math.isclose(math.hypot(*line["quaternion"]), 1, abs_tol=1e-4)


def test_user_errors_exit_2_with_one_line(trained, tmp_path):
    assert_user_error(
        posetune(
            "train",
            f"dataset.root={tmp_path / 'none'}",
            f"system.out_dir={tmp_path / 'r'}",
            "model.backbone=resnet18",
        ),
        "does not exist",
    )
    assert_user_error(posetune("train", "model.backbone=vgg61"), "model.backbone = 'vgg61'", "resnet18")
    assert_user_error(posetune("train", "--config", tmp_path / "missing.yaml"), "missing.yaml not found")
    assert_user_error(posetune("evaluate", "--checkpoint", tmp_path / "none.pt"), "none.pt")
    assert_user_error(
        posetune("predict", "--checkpoint", trained / "run/checkpoints/best.pt", tmp_path / "x.png"),
        "x.png not found",
    )
    assert_user_error(posetune("data", "synth", trained / "data", "--train", 2, "--val", 0), "already exists")
    assert_user_error(
        posetune("config", env={"POSETUNE_TRAIN__EPOCHS": "zero"}), "POSETUNE_TRAIN__EPOCHS", "valid integer"
    )
    assert_user_error(
        posetune("search", "search_spaces/quick.yaml", "--retry-failed"), "--retry-failed", "use it with --resume"
    )
    assert posetune("evaluate").returncode == 2  # argparse: missing --checkpoint


def test_data_check_and_config_commands(trained):
    check = posetune("data", "check", trained / "data", "--splits", "train", "val", "test")
    assert check.returncode == 0 and "legacy" in check.stdout and " 48 " in check.stdout
    keys = posetune("config", "--keys")
    assert "train.batch_size" in keys.stdout.splitlines()
    shown = posetune("config", "--config", "configs/quick.yaml", "train.epochs=3")
    assert "epochs: 3" in shown.stdout and "backbone: mobilenet_v3_small" in shown.stdout


def test_user_errors_leave_nothing_behind(tmp_path, monkeypatch):
    """Found by trying posetune as a new user: a bad port or a missing dataset must not leave a
    run folder, an MLflow database or an artifact folder behind (the embedded store included)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the embedded store in ./runs, as a user has it
    port = posetune("ui", "--port", "99999", cwd=tmp_path)
    assert_user_error(port, "--port 99999 is not a TCP port")
    assert len(port.stderr.strip().splitlines()) == 1
    missing = posetune("train", "dataset.root=/nonexistent", "model.backbone=resnet18", cwd=tmp_path)
    assert_user_error(missing, "/nonexistent")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["data", "check", "gs://Bad_Bucket!/x"], ["gs://Bad_Bucket!/x: 'Bad_Bucket!' is not a bucket name (3-63"]),
        (
            ["predict", "--model", "models:/nosuch-model/latest", "x.png"],
            ["cannot load models:/nosuch-model/latest: there is no MLflow store at sqlite:///", "--tracking-uri"],
        ),
        (
            ["data", "push", "{data}", "not-a-bucket"],
            ["DEST not-a-bucket is not a bucket location: push uploads to gs://BUCKET/PATH/ or gs://BUCKET/PATH.zip"],
        ),
        (["data", "push", "{data}", "gs:/typo/x"], ["DEST gs:/typo/x is not a bucket location"]),
    ],
    ids=["bad-bucket-name", "model-without-a-store", "push-to-a-folder", "push-to-a-typo"],
)
def test_bad_inputs_a_new_user_tried(args, fragments, synth_small, tmp_path, monkeypatch):
    """Issue 18's bad inputs: one line naming the input and what is allowed, exit code 2, no
    traceback, nothing written (no cache folder, no runs/mlflow.db, no local 'upload')."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the embedded store in ./runs, as a user has it
    work = tmp_path / "work"
    work.mkdir()
    proc = posetune(
        *(str(synth_small) if a == "{data}" else a for a in args),
        cwd=work,
        env={"XDG_CACHE_HOME": str(tmp_path / "xdg")},
    )
    assert_user_error(proc, *fragments)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert list(work.iterdir()) == [] and not (tmp_path / "xdg").exists()


def test_data_push_help_says_dest_is_a_bucket():
    help_text = " ".join(posetune("data", "push", "--help").stdout.split())
    assert "DEST gs://BUCKET/PATH/ or gs://BUCKET/PATH.zip" in help_text


def test_experiments_open_on_the_runs_table(tmp_path):
    from mlflow import MlflowClient

    from posetune.tracking.store import experiment_id_for

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    created = experiment_id_for(client, "new", uri)
    old = client.create_experiment("old")  # one made before posetune tagged its experiments
    assert experiment_id_for(client, "old", uri) == old
    for experiment_id in (created, old):
        assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.server
def test_train_exits_1_naming_what_mlflow_did_not_receive(server, synth_small, tmp_path, capsys, monkeypatch):
    """A real server that answers 500 to every upload: the run's files and checkpoint do not
    reach it, and `posetune train` says so and exits 1 (it used to exit 0)."""
    from posetune import cli

    monkeypatch.setattr("posetune.tracking.store.BRIEF_RETRY_S", 1.0)  # the default retries 30 s per upload
    server.refuse_uploads()
    code = cli.main(
        [
            "train",
            "--config",
            "configs/quick.yaml",
            f"dataset.root={synth_small}",
            f"system.out_dir={tmp_path / 'run'}",
            f"tracking.tracking_uri={server.uri}",
            *FAST,
        ]
    )
    out = capsys.readouterr().out
    assert code == 1, out
    assert "error: MLflow did not receive the final status, config, metrics and best checkpoint" in out
    assert "best evaluation (epoch" in out  # the training itself is reported as usual
    assert (tmp_path / "run" / "checkpoints" / "best.pt").exists()  # and kept in the run folder
