import math

import pytest
import torch

from posetune.data.geometry import quat_from_axis_angle
from posetune.errors import ConfigError
from posetune.train.losses import ORIENTATION_LOSSES, get_orientation_loss, pose_loss
from posetune.train.metrics import METRIC_NAMES, metric_mode, pose_metrics, rotation_angle


def q(axis: str, degrees: float) -> torch.Tensor:
    return torch.tensor(quat_from_axis_angle(axis, degrees), dtype=torch.float32)


def test_rotation_angle_hand_computed_cases():
    identity = torch.tensor([0.0, 0.0, 0.0, 1.0])
    cases = torch.stack([identity, -identity, q("y", 90), q("x", 180), q("z", -45), -q("z", 30)])
    expected = torch.tensor([0.0, 0.0, 90.0, 180.0, 45.0, 30.0], dtype=torch.float64)
    angles = torch.rad2deg(rotation_angle(cases, identity.expand(6, 4)))
    assert torch.allclose(angles, expected, atol=1e-5)


def test_rotation_angle_is_sign_invariant_and_symmetric():
    a, b = q("y", 37), q("x", 81)
    base = rotation_angle(a[None], b[None])
    for x, y in [(-a, b), (a, -b), (-a, -b), (b, a)]:
        assert torch.allclose(rotation_angle(x[None], y[None]), base, atol=1e-9)


def test_rotation_angle_is_precise_near_zero_where_arccos_fails():
    tiny = q("y", 1e-4)  # 1e-4 degrees
    angle = torch.rad2deg(rotation_angle(tiny[None].double(), torch.tensor([[0.0, 0.0, 0.0, 1.0]]).double()))
    assert angle.item() == pytest.approx(1e-4, rel=1e-3)


def test_pose_metrics_hand_computed():
    target_t = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [1.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    pred_t = target_t + torch.tensor([[0.01, 0, 0], [0, 0.03, 0.04], [0, 0, 0], [0, 0, 0.1]])
    target_q = torch.stack([q("y", 0), q("y", 0), q("y", 0), q("y", 0)])
    pred_q = torch.stack([-q("y", 4), q("y", 8), q("x", 180), q("y", 90)])
    m = pose_metrics(pred_t, pred_q, target_t, target_q)
    assert set(m) == set(METRIC_NAMES)
    assert m["translation_mse"] == pytest.approx((0.01**2 + 0.03**2 + 0.04**2 + 0.1**2) / 12)
    assert m["translation_error_cm"] == pytest.approx((1 + 5 + 0 + 10) / 4)
    assert m["orientation_error_deg"] == pytest.approx((4 + 8 + 180 + 90) / 4, abs=1e-4)
    assert m["orientation_rad"] == pytest.approx(math.radians((4 + 8 + 180 + 90) / 4), abs=1e-6)
    assert m["orientation_error_deg_median"] == pytest.approx(8, abs=1e-4)  # lower median
    assert m["within_2cm_5deg"] == pytest.approx(1 / 4)  # only the first (1 cm, 4 deg)
    assert m["within_5cm_10deg"] == pytest.approx(2 / 4)  # first two
    assert m["pose_error"] == pytest.approx(0.5 * (4 / 2 + 70.5 / 5), abs=1e-4)


def test_symmetric_metrics_are_translation_only():
    t = torch.zeros(3, 3)
    m = pose_metrics(t + 0.02, None, t, torch.zeros(3, 4))
    assert m["translation_error_cm"] == pytest.approx(100 * math.sqrt(3 * 0.02**2))
    assert "orientation_error_deg" not in m and m["pose_error"] == pytest.approx(m["translation_error_cm"] / 2)


def test_metric_modes():
    assert metric_mode("within_2cm_5deg") == "max" and metric_mode("pose_error") == "min"


@pytest.mark.parametrize("name", sorted(ORIENTATION_LOSSES))
def test_orientation_losses_zero_at_target(name):
    target = torch.stack([q("y", 30), q("x", 170)])
    assert get_orientation_loss(name)(target, target).item() == pytest.approx(0, abs=1e-7)
    assert get_orientation_loss(name)(torch.stack([q("y", 90), q("x", 10)]), target).item() > 0.01


def test_sign_invariance_of_the_default_loss_and_not_of_the_reference_mse():
    target = torch.stack([q("y", 30), q("x", 170)])
    assert get_orientation_loss("sign_invariant")(-target, target).item() == pytest.approx(0, abs=1e-7)
    assert get_orientation_loss("geodesic")(-target, target).item() == pytest.approx(0, abs=1e-7)
    assert get_orientation_loss("mse")(-target, target).item() == pytest.approx(1.0)  # |2q|^2 / 4


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ConfigError, match="geodesic, mse, sign_invariant"):
        get_orientation_loss("l1")


def test_pose_loss_weights_orientation_by_beta():
    t, target_q = torch.zeros(2, 3), torch.stack([q("y", 0), q("y", 0)])
    pred_q = torch.stack([q("y", 90), q("y", 90)])
    mse = get_orientation_loss("mse")
    one = pose_loss(t + 0.1, pred_q, t, target_q, 1.0, mse)
    three = pose_loss(t + 0.1, pred_q, t, target_q, 3.0, mse)
    assert (three - one).item() == pytest.approx(2 * mse(pred_q, target_q).item(), rel=1e-6)
    assert pose_loss(t + 0.1, None, t, target_q, 3.0, mse).item() == pytest.approx(0.01, rel=1e-5)
