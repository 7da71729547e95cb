"""The names a config can choose (posetune.choices, torch-free) are exactly the registries'."""

from posetune import choices
from posetune.search.searchers import SAMPLERS, SCHEDULERS, list_samplers
from posetune.train.losses import ORIENTATION_LOSSES, list_orientation_losses
from posetune.train.metrics import pose_metrics
from posetune.train.model import BACKBONES, list_backbones
from posetune.train.schedule import SCHEDULES, list_schedules


def test_choices_match_the_registries():
    assert sorted(choices.BACKBONES) == list_backbones() == sorted(BACKBONES)
    assert sorted(choices.ORIENTATION_LOSSES) == list_orientation_losses() == sorted(ORIENTATION_LOSSES)
    assert sorted(choices.SCHEDULES) == list_schedules() == sorted(SCHEDULES)
    assert sorted(choices.SEARCHERS) == list_samplers() == sorted(SAMPLERS)
    assert sorted(choices.SCHEDULERS) == sorted(SCHEDULERS)


def test_metric_names_are_what_pose_metrics_returns():
    import torch

    q = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    assert set(pose_metrics(torch.zeros(1, 3), q, torch.zeros(1, 3), q)) == set(choices.METRIC_NAMES)
