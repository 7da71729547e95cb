import subprocess
import sys

import pytest
import yaml

from posetune.config import Config, config_from_dict, config_keys, load_config, parse_image_scale
from posetune.errors import ConfigError


def test_defaults_follow_the_reference():
    cfg = Config()
    assert cfg.estimator.label_name == "cube_position"
    assert (cfg.train.batch_size, cfg.train.accumulation_steps, cfg.train.epochs) == (20, 10, 120)
    assert cfg.train.beta_loss == 1.0 and cfg.val.eval_freq == 4 and cfg.checkpoint.save_frequency == 1
    assert (cfg.optimizer.lr, cfg.optimizer.beta_1, cfg.optimizer.beta_2) == (1e-4, 0.9, 0.999)
    assert cfg.model.backbone == "vgg16" and cfg.dataset.image_size == (224, 224)
    assert cfg.model.translation_head == [256, 64] and not cfg.dataset.symmetric


def test_priority_defaults_yaml_env_arguments(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  batch_size: 8\n  beta_loss: 2.0\noptimizer:\n  lr: 1e-3\n")
    env = {"POSETUNE_TRAIN__BATCH_SIZE": "16", "POSETUNE_TRAIN__BETA_LOSS": "3", "POSETUNE_SEED": "5"}
    cfg = load_config(path, ["train.beta_loss=4.5", "dataset.crop=[1, 2, 30, 40]"], environ=env)
    assert cfg.train.epochs == 7  # YAML over default
    assert cfg.optimizer.lr == 1e-3  # YAML "1e-3" (a string to PyYAML) is coerced to float
    assert cfg.train.batch_size == 16  # environment over YAML
    assert cfg.seed == 5
    assert cfg.train.beta_loss == 4.5  # argument over environment
    assert cfg.dataset.crop == [1, 2, 30, 40]
    assert cfg.train.accumulation_steps == 10  # untouched default


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  bach_size: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["optimizer.lrr=0.1", "trian.epochs=3"], environ={})
    message = str(err.value)
    assert "train.bach_size" in message and "did you mean train.batch_size?" in message and str(path) in message
    assert "optimizer.lrr" in message and "did you mean optimizer.lr?" in message
    assert "trian.epochs" in message and "did you mean train.epochs?" in message


def test_unknown_environment_variable_is_an_error():
    with pytest.raises(ConfigError, match=r"train\.epoch .*POSETUNE_TRAIN__EPOCH.*did you mean train\.epochs"):
        load_config(environ={"POSETUNE_TRAIN__EPOCH": "3"})


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.batch_size=-3", r"train\.batch_size = -3 .*greater than 0"),
        ("train.epochs=many", r"train\.epochs = 'many' .*valid integer"),
        ("optimizer.lr=0", r"optimizer\.lr = 0 .*greater than 0"),
        ("optimizer.beta_2=1.5", r"optimizer\.beta_2 = 1\.5 .*less than 1"),
        ("precision=fp8", r"precision = 'fp8' .*'auto', 'fp32', 'bf16' or 'fp16'"),
        ("device=gpu", r"device = 'gpu' .*auto, cpu, cuda, cuda:N or mps"),
        ("dataset.image_scale=12x", r"dataset\.image_scale = '12x' .*WIDTHxHEIGHT"),
        ("dataset.crop=[10, 10, 5, 50]", r"dataset\.crop .*left < right"),
        ("dataset.normalize=zscore", r"dataset\.normalize = 'zscore' .*'imagenet' or 'none'"),
        ("model.translation_head=[64, 0]", r"model\.translation_head .*> 0"),
        ("train.shuffle=perhaps", r"train\.shuffle = 'perhaps' .*valid boolean"),
    ],
)
def test_bad_values_name_key_value_and_rule(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(overrides=[override], environ={})


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.epochs=0", "val.eval_freq=-1", "nope=1"], environ={})
    assert str(err.value).count("\n") == 3


def test_override_syntax_error():
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config(overrides=["train.epochs"], environ={})


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n   batch_size: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+"):
        load_config(bad, environ={})
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listing, environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_image_scale_forms():
    assert parse_image_scale(224) == (224, 224)
    assert parse_image_scale("128x96") == (128, 96)
    assert parse_image_scale("64") == (64, 64)
    with pytest.raises(ValueError):
        parse_image_scale(8)


def test_round_trip_through_yaml_and_dict():
    cfg = load_config(overrides=["dataset.image_scale=128x80", "model.backbone=resnet18"], environ={})
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_keys_cover_the_acceptance_names():
    keys = set(config_keys())
    for key in [
        "dataset.root",
        "dataset.image_scale",
        "dataset.crop",
        "model.backbone",
        "train.epochs",
        "train.batch_size",
        "train.accumulation_steps",
        "train.beta_loss",
        "optimizer.lr",
        "system.out_dir",
        "seed",
        "device",
        "precision",
        "loss.orientation",
        "val.eval_freq",
        "checkpoint.save_frequency",
        "model.pretrained_weights",
    ]:
        assert key in keys


def test_shipped_configs_load():
    for name in ["configs/reference.yaml", "configs/quick.yaml"]:
        load_config(name, environ={})
    reference = load_config("configs/reference.yaml", environ={})
    assert reference.model.backbone == "vgg16" and reference.dataset.image_size == (224, 224)
    assert (reference.train.batch_size, reference.train.accumulation_steps, reference.train.epochs) == (
        20,
        10,
        120,
    )


def test_cli_config_error_is_one_line_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "posetune", "config", "train.bach_size=3"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "did you mean train.batch_size?" in proc.stderr
