"""Search-space files: every bad case gives its message; sampling and derived values."""

import optuna
import pytest
import yaml

from posetune.errors import ConfigError
from posetune.search.space import EFFECTIVE_BATCH, DefineByRun, accumulation_for, load_space, trial_config

SPACE = {
    "base": {"config": "configs/quick.yaml", "overrides": {"dataset.root": "DATA"}},
    "parameters": {
        "optimizer.lr": {"distribution": "loguniform", "low": 1e-4, "high": 1e-2},
        "train.batch_size": {"distribution": "choice", "values": [8, 16]},
        EFFECTIVE_BATCH: {"distribution": "int", "low": 16, "high": 64, "log": True},
        "optimizer.schedule": {"distribution": "choice", "values": ["cosine", "constant"]},
        "optimizer.warmup_epochs": {
            "distribution": "uniform",
            "low": 0,
            "high": 2,
            "when": {"optimizer.schedule": "cosine"},
        },
        "model.backbone": {"distribution": "fixed", "value": "resnet18"},
    },
    "search": {"num_samples": 4, "asha": {"max_samples": 960, "grace_samples": 96}},
    "storage": {"name": "t"},
}


def write(tmp_path, space, name="space.yaml"):
    text = yaml.safe_dump(space).replace(
        "configs/quick.yaml", str(__import__("pathlib").Path("configs/quick.yaml").resolve())
    )
    path = tmp_path / name
    path.write_text(text.replace("DATA", str(tmp_path)))
    return path


def edited(**changes):
    import copy

    space = copy.deepcopy(SPACE)
    for dotted, value in changes.items():
        node = space
        *parents, leaf = dotted.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(leaf)
        else:
            node[leaf] = value
    return space


def test_shipped_spaces_validate():
    for name in ["search_spaces/quick.yaml", "search_spaces/default.yaml"]:
        space, base = load_space(name)
        assert space.search.metric == "pose_error" and space.search.resolved_mode == "min"
    quick, base = load_space("search_spaces/quick.yaml")
    assert base.model.backbone == "mobilenet_v3_small" and quick.base.synthetic.train == 2000
    default, base = load_space("search_spaces/default.yaml")
    assert base.model.backbone == "vgg16" and default.search.points_to_evaluate[0]["optimizer.lr"] == 1e-4


def test_overrides_and_name_apply_to_the_space_and_its_base_config(tmp_path):
    space, base = load_space(write(tmp_path, SPACE), ["search.num_samples=2", "train.epochs=3"], name="other")
    assert space.search.num_samples == 2 and base.train.epochs == 3 and space.storage.name == "other"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"parameters/optimizer.lr/low": 0.1},
            r"parameters\.optimizer\.lr: low must be < high, got low=0\.1 high=0\.01",
        ),
        ({"parameters/optimizer.lr/low": -1}, r"parameters\.optimizer\.lr: a log distribution needs low > 0"),
        ({"parameters/train.batch_size/values": []}, r"parameters\.train\.batch_size: choice needs a non-empty"),
        (
            {"parameters/optimizer.lrr": {"distribution": "uniform", "low": 0, "high": 1}},
            r"parameters\.optimizer\.lrr: unknown config key; did you mean optimizer\.lr\?",
        ),
        (
            {"parameters/optimizer.lr/distribution": "gaussian"},
            r"distribution = 'gaussian' is not known; choose one of: loguniform, uniform, int, choice, fixed",
        ),
        (
            {"parameters/train.batch_size/values": [0, 8]},
            r"parameters\.train\.batch_size: value 0 is not allowed: .*greater than 0",
        ),
        (
            {"parameters/optimizer.warmup_epochs/when": {"optimizer.schedule": "step"}},
            r"optimizer\.schedule never takes the value 'step'",
        ),
        (
            {"parameters/optimizer.warmup_epochs/when": {"train.epochs": 3}},
            r"train\.epochs must be a parameter declared before",
        ),
        ({"search/metric": "accuracy"}, r"search\.metric = 'accuracy' is not a metric"),
        ({"search/asha/grace_samples": 5000}, r"grace_samples = 5000 must be <= max_samples"),
        # Equal compute: every batch size reaches each evaluation milestone, and ASHA's rungs
        # and the budget are milestones.
        (
            {"search/asha/grace_samples": 100},
            r"search\.asha\.grace_samples = 100: every trial must reach each evaluation milestone exactly, "
            r"so it must be a multiple of 16 \(train\.batch_size \[8, 16\] x 1 worker\(s\)\); try 96",
        ),
        (
            {"base/overrides": {"dataset.root": "DATA", "val.eval_every_samples": 64}},
            r"the rung at 96 samples .* is not a multiple of val\.eval_every_samples = 64",
        ),
        ({"search/asha/max_samples": 1000}, r"max_samples = 1,000 must be a multiple of search\.asha\.grace_samples"),
        ({"search/scheduler": "hyperband"}, r"search\.scheduler = 'hyperband': is not known; choose one of: asha"),
        (
            {"search/points_to_evaluate": [{"optimizer.lr": 5.0}]},
            r"points_to_evaluate\[0\]\.optimizer\.lr = 5\.0 is outside",
        ),
        ({"search/searchr": "tpe"}, r"search\.searchr: unknown key in search; did you mean searcher\?"),
        ({"search/searcher": "grid"}, r"search\.searcher = 'grid': is not known; choose one of: cmaes, gp, qmc"),
        ({"search/searcher": "tpee"}, r"search\.searcher = 'tpee': .*is not known; did you mean tpe\? choose one of"),
        ({"storage/name": "a b"}, r"storage\.name = 'a b': string should match pattern"),
        ({"storage": None}, r"storage: required"),
        (
            {"parameters/train.accumulation_steps": {"distribution": "int", "low": 1, "high": 4}},
            r"derived from effective_batch; declare only one",
        ),
        (
            {"parameters/train.batch_size/values": [8, 128]},
            r"effective_batch: its largest value 64 is below train.batch_size 128",
        ),
        ({"base/overrides": {"dataset.root": "/nonexistent/x"}}, r"dataset\.root = '/nonexistent/x' does not exist"),
        ({"base/config": "missing.yaml"}, r"base\.config: missing\.yaml not found"),
        pytest.param(
            {"resources/prices": {"GPU": -1}},
            r"resources\.prices\.GPU = -1: input should be greater than or equal to 0",
            id="negative-price",
        ),
        (
            {"base/overrides": {"dataset.root": "DATA", "train.bach_size": 3}},
            r"base: train\.bach_size .*did you mean train\.batch_size",
        ),
    ],
)
def test_each_bad_case_has_its_message(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_space(write(tmp_path, edited(**changes)))


def test_all_problems_reported_together(tmp_path):
    space = edited(
        **{"parameters/optimizer.lr/low": 0.5, "search/metric": "acc", "parameters/train.batch_size/values": []}
    )
    with pytest.raises(ConfigError) as err:
        load_space(write(tmp_path, space))
    message = str(err.value)
    assert "parameters.optimizer.lr: low must be < high" in message
    assert "search.metric = 'acc' is not a metric" in message
    assert "parameters.train.batch_size: choice needs a non-empty" in message


def test_define_by_run_samples_conditionals_and_constants(tmp_path):
    space, base = load_space(write(tmp_path, SPACE))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_warmup = {True: 0, False: 0}
    for _ in range(30):
        trial = study.ask()
        constants = DefineByRun(space)(trial)
        assert constants == {"model.backbone": "resnet18"}
        cosine = trial.params["optimizer.schedule"] == "cosine"
        assert ("optimizer.warmup_epochs" in trial.params) == cosine
        seen_warmup[cosine] += 1
        assert 1e-4 <= trial.params["optimizer.lr"] <= 1e-2
        params = {**trial.params, **constants}
        cfg = trial_config(space, base, params)
        effective = cfg.train.batch_size * cfg.train.accumulation_steps
        assert 16 <= effective <= 64 and cfg.model.backbone == "resnet18"
        study.tell(trial, 1.0)
    assert seen_warmup[True] and seen_warmup[False]


@pytest.mark.parametrize(
    ("effective", "batch", "workers", "expected"),
    [(64, 16, 1, 4), (40, 16, 1, 2), (17, 16, 1, 1), (64, 16, 2, 2), (100, 32, 1, 3), (64, 64, 1, 1)],
)
def test_accumulation_is_derived_inside_the_bounds(effective, batch, workers, expected):
    steps = accumulation_for(effective, batch, workers, (16, 100))
    assert steps == expected
    assert 16 <= steps * batch * workers <= 100 or steps == 1


@pytest.mark.ray  # starts no Ray, but plans for a Ray cluster running on this node if there is one
def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    path = write(tmp_path, SPACE)
    before = set(tmp_path.rglob("*"))
    proc = subprocess.run(
        [sys.executable, "-m", "posetune", "search", str(path), "--dry-run", f"storage.path={tmp_path}/s"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "optimizer.warmup_epochs  uniform [0, 2]  when optimizer.schedule=cosine" in proc.stdout
    assert "trials: 4 (tpe searcher" in proc.stdout and "trials at once: " in proc.stdout
    assert set(tmp_path.rglob("*")) == before


def test_invalid_space_via_cli_exits_2_without_traceback(tmp_path):
    import subprocess
    import sys

    path = write(tmp_path, edited(**{"parameters/optimizer.lr/low": 0.5}))
    proc = subprocess.run([sys.executable, "-m", "posetune", "search", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "parameters.optimizer.lr: low must be < high" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_every_candidate_name_is_checked_when_the_file_is_read(tmp_path):
    """Typos in names a user chooses fail at load time (so `--dry-run` catches them), each
    with the list of valid names, instead of inside a Ray trial."""
    import subprocess
    import sys

    space = edited(
        **{
            "parameters/model.backbone": {"distribution": "choice", "values": ["vgg16", "vgg17"]},
            "parameters/loss.orientation": {"distribution": "fixed", "value": "geodesik"},
            "parameters/optimizer.schedule": {"distribution": "choice", "values": ["cosin", "constant"]},
            "parameters/optimizer.warmup_epochs": None,
            "base/overrides/checkpoint.monitor": "pose_eror",
        }
    )
    path = write(tmp_path, space)
    with pytest.raises(ConfigError) as caught:
        load_space(path)
    message = str(caught.value)
    assert "parameters.model.backbone: value 'vgg17' is not allowed" in message
    assert "choose one of: efficientnet_b0, mobilenet_v3_large, mobilenet_v3_small" in message
    assert "parameters.loss.orientation: value 'geodesik' is not allowed" in message
    assert "choose one of: geodesic, mse, sign_invariant" in message
    assert "parameters.optimizer.schedule: value 'cosin' is not allowed" in message
    assert "checkpoint.monitor = 'pose_eror'" in message and "pose_error" in message
    dry = subprocess.run(
        [sys.executable, "-m", "posetune", "search", str(path), "--dry-run"], capture_output=True, text=True
    )
    assert dry.returncode == 2 and "vgg17" in dry.stderr and "dry run" not in dry.stdout


def test_validating_a_search_file_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from posetune.search.space import load_space; load_space('search_spaces/quick.yaml'); "
    code += "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_values_reach_the_config_typed_not_reparsed(tmp_path):
    """base.overrides and sampled values are YAML values already: a '#' or a space in a path,
    or a quoted "off" / "no", must arrive as written (re-parsing "k=v" text would cut the path
    at '#' and turn "off" into False)."""
    data = tmp_path / "my data" / "run #2"
    data.mkdir(parents=True)
    space = edited(
        **{
            "base/overrides/dataset.root": str(data),
            "base/overrides/estimator.label_name": "off",
            "parameters/dataset.train_split": {"distribution": "choice", "values": ["no", "train"]},
        }
    )
    loaded, base = load_space(write(tmp_path, space))
    assert base.dataset.root == str(data) and base.estimator.label_name == "off"
    params = {"optimizer.lr": 1e-3, "train.batch_size": 8, EFFECTIVE_BATCH: 16, "dataset.train_split": "no"}
    params |= {"optimizer.schedule": "constant", "model.backbone": "resnet18"}
    cfg = trial_config(loaded, base, params)
    assert cfg.dataset.train_split == "no" and cfg.dataset.root == str(data) and cfg.estimator.label_name == "off"
