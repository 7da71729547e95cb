"""The pose network: a torchvision backbone without its classifier, and the reference's heads.

Backbones are chosen by name in YAML (`model.backbone`), so they live in a registry: a dict
from name to (torchvision model name, function that strips the classifier and returns the
feature width). `list_backbones()` discovers them; `create_model(cfg.model, symmetric)` builds.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
import torchvision
from torch import nn

from posetune import storage
from posetune.choices import unknown_choice
from posetune.config import ModelConfig
from posetune.errors import ConfigError, PosetuneError

log = logging.getLogger(__name__)


# Every backbone below ends in features -> `avgpool` (an AdaptiveAvgPool2d) -> flatten ->
# classifier. The classifier is removed; `avgpool` decides how much of *where* things are
# survives: VGG keeps a 7x7 grid (the reference's 25,088-d feature), the others pool globally,
# which throws away the object's image position. `model.pool_size` sets that grid.


def _strip_vgg(model: nn.Module) -> tuple[int, int]:
    model.classifier = nn.Identity()
    return 512, 7


def _strip_resnet(model: nn.Module) -> tuple[int, int]:
    channels = model.fc.in_features
    model.fc = nn.Identity()
    return channels, 1


def _strip_classifier_head(model: nn.Module) -> tuple[int, int]:
    """MobileNet / EfficientNet: classifier is (..., Linear, ...)."""
    channels = next(m.in_features for m in model.classifier.modules() if isinstance(m, nn.Linear))
    model.classifier = nn.Identity()
    return channels, 1


# name -> (torchvision model name, strip function returning (channels, default pool grid))
BACKBONES: dict[str, tuple[str, Callable[[nn.Module], tuple[int, int]]]] = {
    "vgg16": ("vgg16", _strip_vgg),  # the reference
    "resnet18": ("resnet18", _strip_resnet),
    "resnet34": ("resnet34", _strip_resnet),
    "resnet50": ("resnet50", _strip_resnet),
    "mobilenet_v3_small": ("mobilenet_v3_small", _strip_classifier_head),
    "mobilenet_v3_large": ("mobilenet_v3_large", _strip_classifier_head),
    "efficientnet_b0": ("efficientnet_b0", _strip_classifier_head),
}


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def create_backbone(
    name: str,
    pretrained_weights: str | None = None,
    pool_size: int | None = None,
    batchnorm_momentum: float | None = None,
) -> tuple[nn.Module, int]:
    """(backbone, feature width). Weights only ever come from a local file."""
    if name not in BACKBONES:
        raise unknown_choice("model.backbone", name, BACKBONES)
    torchvision_name, strip = BACKBONES[name]
    model = torchvision.models.get_model(torchvision_name, weights=None)
    if pretrained_weights:
        _load_pretrained(model, name, pretrained_weights)
    if batchnorm_momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = batchnorm_momentum
    channels, grid = strip(model)
    if pool_size is not None:
        model.avgpool, grid = nn.AdaptiveAvgPool2d(pool_size), pool_size
    return model, channels * grid * grid


def _load_pretrained(model: nn.Module, name: str, path: str) -> None:
    if not storage.exists(path):
        raise ConfigError(f"model.pretrained_weights = {path!r}: file not found")
    try:
        data = storage.read_bytes(path)  # a local file, gs:// or http(s)://
    except PosetuneError as exc:
        raise ConfigError(f"model.pretrained_weights: {exc}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise ConfigError(f"model.pretrained_weights = {path!r}: cannot read ({exc})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"model.pretrained_weights = {path!r} does not fit {name}: {first}") from None
    log.info("loaded %s weights from %s", name, path)


def _mlp(in_features: int, widths: list[int], out_features: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
        in_features = width
    layers.append(nn.Linear(in_features, out_features))
    return nn.Sequential(*layers)


class PoseNet(nn.Module):
    """Image -> (translation (B, 3) metres, quaternion (B, 4) unit (x, y, z, w) or None)."""

    def __init__(self, backbone: nn.Module, features: int, cfg: ModelConfig, symmetric: bool):
        super().__init__()
        self.backbone = backbone
        self.translation_head = _mlp(features, cfg.translation_head, 3)
        # The head predicts standardised offsets from the training set's mean position, so a
        # fresh network starts at the mean instead of at the origin, 1.5 m away. Set by
        # `set_translation_stats`; saved with the weights.
        self.register_buffer("translation_mean", torch.zeros(3))
        self.register_buffer("translation_std", torch.ones(3))
        # Symmetric objects have no well-defined rotation: the reference predicts translation only.
        self.orientation_head = None if symmetric else _mlp(features, cfg.orientation_head, 4)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        features = torch.flatten(self.backbone(images), 1)  # (B, F)
        translation = self.translation_mean + self.translation_std * self.translation_head(features)  # (B, 3)
        if self.orientation_head is None:
            return translation, None
        quaternion = nn.functional.normalize(self.orientation_head(features).float(), dim=1)  # (B, 4)
        return translation, quaternion

    def set_translation_stats(self, translations: torch.Tensor) -> None:
        """Centre the translation output on these (N, 3) labels."""
        self.translation_mean.copy_(translations.mean(dim=0))
        self.translation_std.copy_(translations.std(dim=0).clamp_min(1e-3))


def create_model(cfg: ModelConfig, symmetric: bool = False) -> PoseNet:
    backbone, features = create_backbone(cfg.backbone, cfg.pretrained_weights, cfg.pool_size, cfg.batchnorm_momentum)
    return PoseNet(backbone, features, cfg, symmetric)


# --- Synchronised BatchNorm (model.sync_batchnorm) --------------------------------------------


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose batch statistics are those of every rank's batch together, so that a
    multi-worker (DDP) update equals one big batch's. torch's own ``nn.SyncBatchNorm`` runs
    on GPUs only; this one works on any device (CPU workers, the tests' gloo processes) through
    torch.distributed.nn's differentiable all_reduce. On CUDA posetune uses torch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        channels = x.shape[1]
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # statistics in >= fp32
        count = x.new_tensor([x.numel() / channels], dtype=x32.dtype)
        # (2C + 1,): per-channel sums and sums of squares, and the sample count, of all ranks
        stats = all_reduce(torch.cat([x32.sum((0, 2, 3)), (x32 * x32).sum((0, 2, 3)), count]))
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels : 2 * channels] / total - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        y = (x32 - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def use_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of the model synchronised across ranks (call before DDP wraps it)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = SyncBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            sync.load_state_dict(child.state_dict())
            setattr(model, name, sync.to(next(child.buffers()).device))
        else:
            use_sync_batchnorm(child, device)
    return model
