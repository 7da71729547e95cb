import json

import pytest
import torch
import yaml

from posetune.config import ModelConfig, OptimizerConfig, load_config
from posetune.data.loader import load_split, make_loader
from posetune.errors import CheckpointError, ConfigError, DataError
from posetune.train.checkpoint import load_checkpoint, save_checkpoint
from posetune.train.loop import DIVERGENCE_CHECK_STEPS, Step, TrainingDiverged, fit, train_one_epoch
from posetune.train.losses import get_orientation_loss
from posetune.train.metrics import METRIC_NAMES, pose_metrics
from posetune.train.model import PoseNet
from posetune.train.resume import TrainState
from posetune.train.runtime import Runtime
from posetune.train.schedule import lr_at

TINY = [
    "model.backbone=mobilenet_v3_small",
    "model.pool_size=2",
    "model.translation_head=[32]",
    "model.orientation_head=[32]",
    "dataset.image_scale=64x40",
    "dataset.crop=[195, 165, 455, 325]",
    "train.batch_size=16",
    "train.accumulation_steps=2",
    "train.epochs=2",
    "val.eval_freq=1",
    "optimizer.lr=1e-3",
    "optimizer.schedule=cosine",
    "dataset.num_workers=0",
    "device=cpu",
]


def tiny_config(root, out_dir, *extra):
    return load_config(overrides=[*TINY, f"dataset.root={root}", f"system.out_dir={out_dir}", *extra], environ={})


def trivial_metrics(train_root, val_root):
    """The trivial predictor: the training set's mean position and its mean orientation."""
    train = load_split(tiny_config(train_root, "unused"), "train")
    val = load_split(tiny_config(val_root, "unused"), "val")
    q = train.quaternions.double()
    mean_q = torch.linalg.eigh(q.T @ q).eigenvectors[:, -1].float()  # sign-invariant mean
    n = len(val)
    return pose_metrics(train.translations.mean(0).expand(n, 3), mean_q.expand(n, 4), val.translations, val.quaternions)


@pytest.mark.slow
def test_training_learns_beyond_half_the_trivial_error(synth_learn, tmp_path):
    cfg = load_config(
        "configs/quick.yaml",
        [
            f"dataset.root={synth_learn}",
            f"system.out_dir={tmp_path / 'run'}",
            "train.epochs=16",
            "val.eval_freq=8",
        ],
        environ={},
    )
    result = fit(cfg)
    trivial = trivial_metrics(synth_learn, synth_learn)
    best = result.best
    print("trained", best, "trivial", trivial)
    assert best["translation_error_cm"] <= 0.5 * trivial["translation_error_cm"]
    assert best["orientation_error_deg"] <= 0.5 * trivial["orientation_error_deg"]


def test_run_folder_contents(synth_small, tmp_path):
    cfg = tiny_config(synth_small, tmp_path / "run")
    result = fit(cfg)
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["system"]["out_dir"] == str(run) and saved["model"]["backbone"] == "mobilenet_v3_small"
    metrics = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert set(METRIC_NAMES) <= set(metrics["best"]) and metrics["best"] == result.best
    assert metrics["history"][-1]["samples_seen"] == 2 * (96 // 16) * 16
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert last["epoch"] == 2 and last["config"] == saved and best["epoch"] == metrics["best"]["epoch"]
    assert "optimizer" in last and "optimizer" not in best and best["config"] == saved  # best.pt: weights only
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]  # no temp files
    with pytest.raises(ConfigError, match=r"already holds a run; continue it with checkpoint\.resume="):
        fit(cfg)


def test_resume_ends_where_an_uninterrupted_run_would(synth_small, tmp_path):
    straight = fit(tiny_config(synth_small, tmp_path / "a"))

    class Crash(Exception):
        pass

    def crash_after_first_evaluation(evaluation):
        raise Crash

    with pytest.raises(Crash):
        fit(tiny_config(synth_small, tmp_path / "b"), on_evaluation=crash_after_first_evaluation)
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["epoch"] == 1
    resumed = fit(
        tiny_config(synth_small, tmp_path / "b", f"checkpoint.resume={tmp_path / 'b' / 'checkpoints' / 'last.pt'}")
    )

    def without_timing(history):
        return [{k: v for k, v in record.items() if k != "train_images_per_s"} for record in history]

    assert without_timing(resumed.history) == without_timing(straight.history)
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] and a["samples_seen"] == b["samples_seen"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    # An MLflow run's checkpoints/best.pt keeps the weights and config only: refused, not a KeyError.
    save_checkpoint({key: b[key] for key in ("config", "model", "samples_seen")}, tmp_path / "weights.pt")
    with pytest.raises(ConfigError, match="holds weights only"):
        fit(tiny_config(synth_small, tmp_path / "c", f"checkpoint.resume={tmp_path / 'weights.pt'}"))


def test_evaluations_at_sample_milestones_whatever_the_batch_size(synth_small, tmp_path):
    """val.eval_every_samples: two batch sizes evaluate at the same sample counts (mid-epoch
    here, the epoch being 96 samples), and train.max_samples ends both at the same count."""
    for batch in (16, 32):
        result = fit(
            tiny_config(
                synth_small,
                tmp_path / f"b{batch}",
                f"train.batch_size={batch}",
                "train.epochs=10",
                "train.max_samples=192",
                "val.eval_every_samples=64",
            )
        )
        assert [h["samples_seen"] for h in result.history] == [64, 128, 192], batch
        assert [h["epoch"] for h in result.history] == [0.667, 1.333, 2], batch


def test_resume_from_a_mid_epoch_checkpoint(synth_small, tmp_path):
    """A checkpoint inside an epoch and inside an accumulation group (4 batches done, groups
    of 3) keeps the group's gradients so far, and ends where an uninterrupted run would."""
    settings = ["train.accumulation_steps=3", "val.eval_every_samples=32", "train.max_samples=160"]
    straight = fit(tiny_config(synth_small, tmp_path / "a", *settings))

    class Crash(Exception):
        pass

    def crash_at_64(evaluation):
        if evaluation.samples_seen == 64:
            raise Crash

    with pytest.raises(Crash):
        fit(tiny_config(synth_small, tmp_path / "b", *settings), on_evaluation=crash_at_64)
    last = tmp_path / "b" / "checkpoints" / "last.pt"
    saved = load_checkpoint(last)
    assert (saved["epoch"], saved["batch"], saved["samples_seen"], saved["evaluated_at"]) == (0, 4, 64, 64)
    assert saved["group_gradients"] is not None  # the group's first batch, kept for its update
    resumed = fit(tiny_config(synth_small, tmp_path / "b", *settings, f"checkpoint.resume={last}"))

    def without_timing(history):  # train_loss: the mean since the epoch's start in this process
        return [{k: v for k, v in r.items() if k not in ("train_images_per_s", "train_loss")} for r in history]

    assert [h["samples_seen"] for h in resumed.history] == [32, 64, 96, 128, 160]
    assert without_timing(resumed.history) == without_timing(straight.history)


def test_gradient_accumulation_equals_one_big_batch(synth_small):
    """Batch 8 x 1 step and batch 4 x 2 accumulated give the same update (no BatchNorm here)."""
    cfg = tiny_config(synth_small, "unused", "train.sample_size=8")
    dataset = load_split(cfg, "train", 8)
    models = []
    for batch, accumulate in [(8, 1), (4, 2)]:
        torch.manual_seed(0)
        backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(2))
        model = PoseNet(backbone, 16, ModelConfig(translation_head=[8], orientation_head=[8]), symmetric=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.train.accumulation_steps = accumulate
        loader = make_loader(dataset, batch, shuffle=False, seed=0)
        state = TrainState()
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loss_fn = get_orientation_loss("sign_invariant")
        step = Step(model, optimizer, scaler, loss_fn, Runtime(torch.device("cpu")), run_cfg, lambda step: 0.5)
        train_one_epoch(step, loader, state)
        assert state.step == 1 and state.samples_seen == 8
        models.append(model)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.allclose(p, q, atol=2e-5), (p - q).abs().max().item()  # float32 summation order


def test_divergence_is_reported(synth_small, tmp_path):
    cfg = tiny_config(synth_small, tmp_path / "run", "optimizer.lr=1e12", "optimizer.schedule=constant")
    with pytest.raises(TrainingDiverged, match=r"lower optimizer\.lr") as caught:
        fit(cfg)
    # The loss is read on the host every DIVERGENCE_CHECK_STEPS optimizer steps (and at the end
    # of an epoch), so a diverged run stops within that many steps of its first bad loss.
    per_step = cfg.train.batch_size * cfg.train.accumulation_steps
    assert caught.value.samples_seen <= (DIVERGENCE_CHECK_STEPS + 1) * per_step


def test_loader_workers_train_the_same(synth_small, tmp_path):
    """Worker processes, prefetch and persistent workers change when batches are made, not
    which: the same seed gives the same metrics with and without them."""
    results = [
        fit(tiny_config(synth_small, tmp_path / f"run{workers}", f"dataset.loader_workers={workers}")).best
        for workers in (0, 2)
    ]
    for key in ("translation_error_cm", "orientation_error_deg", "pose_error"):
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-5), key


def test_too_few_samples_for_a_batch(synth_small, tmp_path):
    with pytest.raises(DataError, match="fewer than one batch"):
        fit(tiny_config(synth_small, tmp_path / "run", "train.sample_size=10"))


def test_unknown_names_fail_before_reading_data(tmp_path):
    for override, message in [
        ("model.backbone=resnet9", "model.backbone"),
        ("loss.orientation=l1", "loss.orientation"),
        ("optimizer.schedule=poly", "optimizer.schedule"),
        ("checkpoint.monitor=acc", "checkpoint.monitor"),
    ]:
        with pytest.raises(ConfigError, match=message):
            fit(tiny_config(tmp_path / "no-data", tmp_path / "run", override))


def test_lr_schedule():
    cfg = OptimizerConfig(lr=1.0, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, 100, 10, cfg) == pytest.approx(0.1)  # warm-up starts low
    assert lr_at(9, 100, 10, cfg) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, cfg) == pytest.approx(1.0)
    assert lr_at(100, 100, 10, cfg) == pytest.approx(0.1)
    assert lr_at(55, 100, 10, cfg) == pytest.approx(0.55)
    assert lr_at(50, 100, 0, OptimizerConfig(lr=2.0)) == 2.0


def test_checkpoints_are_validated(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a posetune checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    save_checkpoint({"x": torch.ones(2)}, tmp_path / "sub" / "ok.pt")
    assert torch.equal(load_checkpoint(tmp_path / "sub" / "ok.pt")["x"], torch.ones(2))
