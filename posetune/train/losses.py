"""Training losses: translation MSE + beta_loss x an orientation loss chosen by name.

Orientation losses are picked in YAML (`loss.orientation`), hence a registry. All are scaled
like the reference's MSE (mean over the batch and the 4 components) so `beta_loss` keeps its
meaning when switching.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from posetune.choices import unknown_choice


def orientation_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The reference's loss. Treats q and -q as different although they are the same rotation,
    so it punishes correct predictions whenever the label's sign flips (yaw past 180 degrees)."""
    return F.mse_loss(pred, target)


def orientation_sign_invariant(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE to whichever of target and -target is nearer: zero exactly when the rotations match."""
    plus = (pred - target).pow(2).sum(dim=1)
    minus = (pred + target).pow(2).sum(dim=1)
    return torch.minimum(plus, minus).mean() / 4


def orientation_geodesic(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - <q, q_hat>^2 = sin^2(angle / 2): sign-invariant and smooth, in [0, 1]."""
    dot = (F.normalize(pred, dim=1) * target).sum(dim=1)
    return (1 - dot.pow(2)).mean()


ORIENTATION_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": orientation_mse,
    "sign_invariant": orientation_sign_invariant,
    "geodesic": orientation_geodesic,
}


def list_orientation_losses() -> list[str]:
    return sorted(ORIENTATION_LOSSES)


def get_orientation_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name not in ORIENTATION_LOSSES:
        raise unknown_choice("loss.orientation", name, ORIENTATION_LOSSES)
    return ORIENTATION_LOSSES[name]


def pose_loss(
    translation: torch.Tensor,
    quaternion: torch.Tensor | None,
    target_translation: torch.Tensor,
    target_quaternion: torch.Tensor,
    beta: float,
    orientation_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """MSE(translation) + beta x orientation loss (translation only for symmetric objects)."""
    loss = F.mse_loss(translation.float(), target_translation)
    if quaternion is not None:
        loss = loss + beta * orientation_loss(quaternion.float(), target_quaternion)
    return loss
