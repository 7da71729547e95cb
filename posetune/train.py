"""The training loop: ``fit(cfg)`` calls ``train_one_epoch``, ``evaluate`` and ``lr_at``.

No globals: device, rank and world size come in as arguments, so a Ray Train worker (or any
launcher that has set up torch.distributed) calls ``fit`` directly. Rank 0 writes the run
folder; every rank trains and evaluates its shard.

Run folder (``system.out_dir``):
    config.yaml            the fully resolved config
    checkpoints/last.pt    every ``save_frequency`` epochs and at every evaluation
    checkpoints/best.pt    the evaluation with the best ``checkpoint.monitor`` value
    metrics.json           {"history": [per evaluation], "best": {...}}
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from posetune import storage
from posetune.checkpoint import load_checkpoint, save_checkpoint
from posetune.choices import better, metric_mode
from posetune.config import Config, OptimizerConfig
from posetune.data import (
    PoseDataset,
    load_split,
    loader_workers,
    make_loader,
    normalization,
    set_epoch,
    to_model_input,
)
from posetune.errors import ConfigError, DataError, TrainingDiverged
from posetune.losses import get_orientation_loss, pose_loss
from posetune.metrics import pose_metrics
from posetune.model import create_model, use_sync_batchnorm

log = logging.getLogger(__name__)


# --- Learning-rate schedules (chosen by name in YAML: optimizer.schedule) ---------------------

SCHEDULES: dict[str, Callable[[float, float], float]] = {
    # (progress in [0, 1], floor) -> multiplier of optimizer.lr
    "constant": lambda progress, floor: 1.0,
    "cosine": lambda progress, floor: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)),
    "linear": lambda progress, floor: 1 - (1 - floor) * progress,
}


def list_schedules() -> list[str]:
    return sorted(SCHEDULES)


def lr_at(step: int, total_steps: int, warmup_steps: int, cfg: OptimizerConfig) -> float:
    """Learning rate for an optimizer step: linear warm-up, then the named schedule."""
    if step < warmup_steps:
        return cfg.lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return cfg.lr * SCHEDULES[cfg.schedule](min(1.0, progress), cfg.min_lr_ratio)


# --- Devices and precision --------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r} but no CUDA GPU is available; use device=auto or device=cpu")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None = full fp32. auto: bf16 (or fp16) mixed precision on GPU, fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@dataclass
class Runtime:
    """How tensors are placed and computed for this process."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None
    normalize: str = "imagenet"

    def __post_init__(self) -> None:
        self.constants = normalization(self.device)  # made once: no per-batch host-to-device copy

    @property
    def channels_last(self) -> bool:
        # NHWC is faster for convolutions on GPUs and, measured here, on CPUs too (+15-60%).
        return self.device.type in ("cuda", "cpu")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        return to_model_input(images, self.device, self.normalize, self.channels_last, self.constants)


# --- One epoch, one evaluation ----------------------------------------------------------------


@dataclass
class TrainState:
    """What a checkpoint restores besides weights and optimizer."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    samples_seen: int = 0  # training samples consumed, all ranks together
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None


DIVERGENCE_CHECK_STEPS = 16  # optimizer steps between reads of the loss on the host


def _any_nonfinite(flag: torch.Tensor, rt: Runtime) -> bool:
    """Read the device-side "a loss was not finite" flag: one host-device sync, and every rank
    agrees (all-reduced), so they stop together instead of one waiting in an all-reduce."""
    if rt.world_size > 1:
        flag = flag.clone()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loss_fn: Callable,
    rt: Runtime,
    cfg: Config,
    state: TrainState,
    lr_for_step: Callable[[int], float],
    progress: bool,
) -> float:
    """Train on every batch once; return the mean loss. Gradient accumulation divides each
    micro-batch loss by its group's size, so an update equals that of one big batch.

    Nothing waits for the device in steady state: the loss sum and a "not finite" flag stay on
    the device and are read every DIVERGENCE_CHECK_STEPS optimizer steps and at the epoch's
    end, so a diverging run stops within 16 optimizer steps (16 x accumulation_steps batches)."""
    from tqdm import tqdm

    model.train()
    batches, accumulate = len(loader), cfg.train.accumulation_steps
    loss_sum = torch.zeros((), device=rt.device)
    nonfinite = torch.zeros((), device=rt.device)  # 1.0 once any loss was inf/NaN
    start = time.perf_counter()
    bar = tqdm(
        total=batches,
        desc=f"epoch {state.epoch + 1}/{cfg.train.epochs}",
        unit="batch",
        disable=not progress,
        leave=False,
        file=sys.stderr,
    )
    for i, (images, translations, quaternions) in enumerate(loader):
        # Labels first and asynchronous (pinned memory on CUDA): the copies overlap the forward.
        translations = translations.to(rt.device, non_blocking=True)
        quaternions = quaternions.to(rt.device, non_blocking=True)
        group_start = i - i % accumulate
        group_size = min(accumulate, batches - group_start)
        last_in_group = i - group_start == group_size - 1
        # DDP all-reduces gradients only on the group's last backward.
        sync = (
            model.no_sync()
            if isinstance(model, DistributedDataParallel) and not last_in_group
            else contextlib.nullcontext()
        )
        with sync:
            with rt.autocast():
                translation, quaternion = model(rt.inputs(images))
            loss = pose_loss(translation, quaternion, translations, quaternions, cfg.train.beta_loss, loss_fn)
            scaler.scale(loss / group_size).backward()
        state.samples_seen += len(images) * rt.world_size
        loss = loss.detach()
        loss_sum += loss
        nonfinite = torch.maximum(nonfinite, (~torch.isfinite(loss)).float())
        bar.update()
        if not last_in_group:
            continue
        for group in optimizer.param_groups:
            group["lr"] = lr_for_step(state.step)
        if cfg.optimizer.grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        if state.step % DIVERGENCE_CHECK_STEPS == 0 or i == batches - 1:
            if _any_nonfinite(nonfinite, rt):
                raise TrainingDiverged(
                    f"training diverged at epoch {state.epoch + 1} (loss {loss.item():g}); lower optimizer.lr",
                    state.samples_seen,
                )
            if progress:
                images_per_second = (i + 1) * len(images) * rt.world_size / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{loss_sum.item() / (i + 1):.4f}", img_s=f"{images_per_second:.0f}")
    bar.close()
    return loss_sum.item() / max(1, batches)


@torch.no_grad()
def predict_loader(model: nn.Module, loader, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Predictions for this rank's share of the loader, in loader order (on the CPU)."""
    model.eval()
    translations, quaternions = [], []
    for images, _, _ in loader:
        with rt.autocast():
            translation, quaternion = model(rt.inputs(images))
        translations.append(translation.float().cpu())
        if quaternion is not None:
            quaternions.append(quaternion.float().cpu())
    return torch.cat(translations), torch.cat(quaternions) if quaternions else None


def _gather_interleaved(local: torch.Tensor, total: int, rt: Runtime) -> torch.Tensor:
    """Rank r predicted samples r, r + W, r + 2W, ...: gather them back into dataset order."""
    if rt.world_size == 1:
        return local
    per_rank = math.ceil(total / rt.world_size)
    padded = torch.zeros(per_rank, local.shape[1], device=rt.device)
    padded[: len(local)] = local.to(rt.device)
    parts = [torch.empty_like(padded) for _ in range(rt.world_size)]
    torch.distributed.all_gather(parts, padded)
    out = torch.empty(total, local.shape[1])
    for rank, part in enumerate(parts):
        count = len(range(rank, total, rt.world_size))
        out[rank :: rt.world_size] = part[:count].cpu()
    return out


def evaluate(model: nn.Module, dataset: PoseDataset, batch_size: int, rt: Runtime) -> dict[str, float]:
    """Metrics over the whole dataset (every rank must call this; shards are gathered)."""
    loader = make_loader(dataset, batch_size, shuffle=False, seed=0, rank=rt.rank, world_size=rt.world_size)
    translation, quaternion = predict_loader(model, loader, rt)
    translation = _gather_interleaved(translation, len(dataset), rt)
    if quaternion is not None:
        quaternion = _gather_interleaved(quaternion, len(dataset), rt)
    return pose_metrics(translation, quaternion, dataset.translations, dataset.quaternions)


# --- fit --------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """What ``fit`` tells its ``on_evaluation`` callback after each evaluation."""

    epoch: int
    samples_seen: int
    metrics: dict[str, float]
    is_best: bool
    checkpoint_dir: Path  # holds last.pt (and best.pt); written by rank 0 before the call
    out_dir: Path
    train_loss: float
    train_images_per_s: float  # the last epoch's training throughput, all ranks together


@dataclass
class FitResult:
    out_dir: Path
    best: dict[str, Any]
    history: list[dict[str, Any]]


def default_out_dir() -> Path:
    return Path("runs") / datetime.now().strftime("train-%Y%m%d-%H%M%S")


def _prepare_out_dir(cfg: Config, rank: int) -> Path:
    out_dir = storage.local_path(cfg.system.out_dir, "system.out_dir") if cfg.system.out_dir else default_out_dir()
    last = out_dir / "checkpoints" / "last.pt"
    if rank == 0 and last.exists() and not cfg.checkpoint.resume:
        raise ConfigError(
            f"system.out_dir {out_dir} already holds a run; continue it with "
            f"checkpoint.resume={last} or choose another system.out_dir"
        )
    return out_dir


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": list(random.getstate()[1]),
    }


def _rng_states(rt: Runtime) -> list[dict[str, Any]]:
    """Every rank's RNG state (gathered to all ranks), so that a resumed multi-worker run
    continues each rank's own random stream."""
    if rt.world_size == 1:
        return [_rng_state()]
    states: list[Any] = [None] * rt.world_size
    torch.distributed.all_gather_object(states, _rng_state())
    return states


def _restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate((3, tuple(rng["python"]), None))


def fit(
    cfg: Config,
    *,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
    on_evaluation: Callable[[Evaluation], None] | None = None,
    progress: bool | None = None,
) -> FitResult:
    """Train cfg's model on cfg.dataset; evaluate, checkpoint and report along the way.

    With world_size > 1 the caller has initialised torch.distributed (Ray Train does);
    the model is wrapped in DDP and each rank trains on its shard of every epoch.
    """
    device = device or resolve_device(cfg.device)
    rt = Runtime(device, rank, world_size, autocast_dtype(cfg.precision, device), cfg.dataset.normalize)
    progress = (cfg.system.progress and sys.stderr.isatty()) if progress is None else progress
    progress = progress and rank == 0
    out_dir = _prepare_out_dir(cfg, rank)
    cfg = cfg.model_copy(deep=True)
    cfg.system.out_dir = str(out_dir)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = create_model(cfg.model, cfg.dataset.symmetric).to(device)
    if cfg.model.sync_batchnorm and world_size > 1:
        model = use_sync_batchnorm(model, device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if rank > 0:  # each rank its own random stream (dropout, stochastic depth); rank 0 keeps cfg.seed's
        random.seed(cfg.seed + rank)
        torch.manual_seed(cfg.seed + rank)
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=cfg.optimizer.lr,
        betas=(cfg.optimizer.beta_1, cfg.optimizer.beta_2),
        weight_decay=cfg.optimizer.weight_decay,
        fused=True if cfg.optimizer.fused and device.type == "cuda" else None,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=rt.amp_dtype == torch.float16)
    loss_fn = get_orientation_loss(cfg.loss.orientation)

    train_set = load_split(cfg, cfg.dataset.train_split, cfg.train.sample_size, progress)
    val_set = load_split(cfg, cfg.dataset.val_split, cfg.val.sample_size, progress)
    if len(train_set) < cfg.train.batch_size * world_size:
        raise DataError(
            f"the training split has {len(train_set)} samples, fewer than one batch "
            f"(train.batch_size {cfg.train.batch_size} x {world_size} workers)"
        )
    if rank == 0:  # the run folder appears once the data has been read: a user error leaves none
        storage.write_text(out_dir / "config.yaml", cfg.to_yaml())
    train_loader = make_loader(
        train_set,
        cfg.train.batch_size,
        shuffle=cfg.train.shuffle,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        drop_last=True,
        num_workers=loader_workers(cfg, device),
        pin_memory=device.type == "cuda",
    )

    model.set_translation_stats(train_set.translations.to(device))
    state = TrainState()
    if not cfg.model.pretrained_weights and not cfg.checkpoint.resume and rank == 0:
        log.info("model.pretrained_weights is not set: %s starts from random initialisation", cfg.model.backbone)
    if cfg.checkpoint.resume:
        state = _resume(cfg.checkpoint.resume, model, optimizer, scaler, rank)
        log.info(
            "resumed from %s at epoch %d (%d samples seen)",
            cfg.checkpoint.resume,
            state.epoch,
            state.samples_seen,
        )
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = torch.compile(model) if cfg.train.compile else model  # state_dict() stays model's

    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.accumulation_steps)
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup_steps = round(cfg.optimizer.warmup_epochs * steps_per_epoch)

    def lr_for_step(step: int) -> float:
        return lr_at(step, total_steps, warmup_steps, cfg.optimizer)

    def checkpoint_state() -> dict[str, Any]:
        """Every rank calls this (it gathers each rank's RNG state); rank 0 saves it."""
        rng = _rng_states(rt)
        return {
            "config": cfg.to_dict(),
            "model": _unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": state.epoch,
            "step": state.step,
            "samples_seen": state.samples_seen,
            "history": state.history,
            "best": state.best,
            "rng": rng,  # one state per rank
        }

    checkpoints = out_dir / "checkpoints"
    while state.epoch < cfg.train.epochs:
        set_epoch(train_loader, state.epoch)
        epoch_start = time.perf_counter()
        loss = train_one_epoch(
            step_model, train_loader, optimizer, scaler, loss_fn, rt, cfg, state, lr_for_step, progress
        )
        state.epoch += 1
        throughput = len(train_loader) * cfg.train.batch_size * world_size / (time.perf_counter() - epoch_start)
        if rank == 0:
            log.info(
                "epoch %d/%d  loss %.5f  lr %.2e  %.0f img/s",
                state.epoch,
                cfg.train.epochs,
                loss,
                lr_for_step(max(0, state.step - 1)),
                throughput,
            )
        evaluating = state.epoch % cfg.val.eval_freq == 0 or state.epoch == cfg.train.epochs
        if not evaluating:
            if state.epoch % cfg.checkpoint.save_frequency == 0:
                snapshot = checkpoint_state()
                if rank == 0:
                    save_checkpoint(snapshot, checkpoints / "last.pt")
            continue
        metrics = evaluate(model, val_set, cfg.val.batch_size, rt)
        record = {"epoch": state.epoch, "samples_seen": state.samples_seen, "train_loss": loss, **metrics}
        record["train_images_per_s"] = throughput  # this epoch's training throughput, all ranks
        monitor = cfg.checkpoint.monitor
        best_value = None if state.best is None else state.best[monitor]
        is_best = better(metrics[monitor], best_value, metric_mode(monitor))
        state.history.append(record)
        state.best = record if is_best else state.best
        snapshot = checkpoint_state()
        if rank == 0:
            log.info("eval epoch %d: %s", state.epoch, format_metrics(metrics))
            save_checkpoint(snapshot, checkpoints / "last.pt")
            if is_best:
                save_checkpoint(snapshot, checkpoints / "best.pt")
            storage.write_text(
                out_dir / "metrics.json", json.dumps({"history": state.history, "best": state.best}, indent=2)
            )
        if on_evaluation:
            on_evaluation(
                Evaluation(state.epoch, state.samples_seen, metrics, is_best, checkpoints, out_dir, loss, throughput)
            )
    return FitResult(out_dir, state.best or {}, state.history)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _resume(path: str, model: nn.Module, optimizer, scaler, rank: int = 0) -> TrainState:
    saved = load_checkpoint(path)
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as exc:
        backbone = saved["config"]["model"]["backbone"]
        first_line = str(exc).splitlines()[0]
        raise ConfigError(f"checkpoint.resume {path} holds a different model ({backbone}): {first_line}") from None
    optimizer.load_state_dict(saved["optimizer"])
    scaler.load_state_dict(saved["scaler"])
    rng = saved["rng"]
    rng = rng if isinstance(rng, dict) else rng[rank] if rank < len(rng) else None  # per rank since v2
    if rng is not None:  # a rank the saved run did not have keeps its fresh seed
        _restore_rng(rng)
    return TrainState(saved["epoch"], saved["step"], saved["samples_seen"], saved["history"], saved["best"])


def format_metrics(metrics: dict[str, float]) -> str:
    parts = [f"translation {metrics['translation_error_cm']:.2f} cm"]
    if "orientation_error_deg" in metrics:
        parts.append(f"orientation {metrics['orientation_error_deg']:.2f} deg")
        parts.append(f"within 2cm/5deg {metrics['within_2cm_5deg']:.1%}")
    parts.append(f"pose_error {metrics['pose_error']:.3f}")
    return ", ".join(parts)
