"""Pose metrics: one vectorised, sign-invariant function used by training, evaluate and search.

Keys (all over the whole evaluated set):
- translation_mse            m^2, mean over axes and samples (the reference's metric)
- translation_error_cm       mean Euclidean distance between centres
- orientation_rad            mean rotation angle (the reference's arccos(2<q, q_hat>^2 - 1))
- orientation_error_deg      the same in degrees; orientation_error_deg_median its median
- within_2cm_5deg, within_5cm_10deg   share of samples inside both tolerances, in [0, 1]
- pose_error                 the combined score searches minimise by default:
                             0.5 * (translation_error_cm / 2 + orientation_error_deg / 5),
                             i.e. the mean error in units of the 2 cm / 5 degree tolerance.
Symmetric models (no orientation) report translation keys and pose_error = translation_error_cm / 2.
"""

from __future__ import annotations

import math

import torch

from posetune.choices import HIGHER_IS_BETTER, METRIC_NAMES, metric_mode  # noqa: F401 (re-exported)


def rotation_angle(q1: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
    """Angle (radians, in [0, pi]) of the rotation between unit quaternions, per row.

    4 * atan2(|q1 - s q2|, |q1 + s q2|) with s = sign<q1, q2>: sign-invariant, and accurate
    near 0 and 180 degrees where arccos(2<q1, q2>^2 - 1) needs clamping and loses precision.
    """
    q1 = torch.nn.functional.normalize(q1.double(), dim=-1)
    q2 = torch.nn.functional.normalize(q2.double(), dim=-1)
    sign = torch.where((q1 * q2).sum(-1, keepdim=True) < 0, -1.0, 1.0)
    return 4 * torch.atan2((q1 - sign * q2).norm(dim=-1), (q1 + sign * q2).norm(dim=-1))


def pose_metrics(
    translation: torch.Tensor,
    quaternion: torch.Tensor | None,
    target_translation: torch.Tensor,
    target_quaternion: torch.Tensor,
) -> dict[str, float]:
    """Metrics of predictions (N, 3) / (N, 4) against labels; see the module docstring."""
    error = translation.double() - target_translation.double()  # (N, 3) metres
    distance_cm = error.norm(dim=1) * 100  # (N,)
    metrics = {
        "translation_mse": error.pow(2).mean().item(),
        "translation_error_cm": distance_cm.mean().item(),
    }
    if quaternion is None:
        metrics["pose_error"] = metrics["translation_error_cm"] / 2
        return metrics
    angle = rotation_angle(quaternion, target_quaternion)  # (N,) radians
    degrees = angle * (180 / math.pi)
    metrics |= {
        "orientation_rad": angle.mean().item(),
        "orientation_error_deg": degrees.mean().item(),
        "orientation_error_deg_median": degrees.median().item(),
        "within_2cm_5deg": ((distance_cm <= 2) & (degrees <= 5)).double().mean().item(),
        "within_5cm_10deg": ((distance_cm <= 5) & (degrees <= 10)).double().mean().item(),
    }
    metrics["pose_error"] = 0.5 * (metrics["translation_error_cm"] / 2 + metrics["orientation_error_deg"] / 5)
    return metrics
