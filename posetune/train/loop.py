"""The training loop: ``fit(cfg)`` calls ``train_batches``, ``evaluate`` and ``lr_at``.

No globals: device, rank and world size come in as arguments, so a Ray Train worker (or any
launcher that has set up torch.distributed) calls ``fit`` directly. Rank 0 writes the run
folder; every rank trains and evaluates its shard.

Run folder (``system.out_dir``):
    config.yaml            the fully resolved config
    checkpoints/last.pt    every ``save_frequency`` epochs and at every evaluation (mid-epoch too)
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from posetune import storage
from posetune.choices import better, metric_mode
from posetune.config import Config, OptimizerConfig
from posetune.data.loader import (
    PoseDataset,
    load_split,
    loader_workers,
    make_loader,
    normalization,
    set_epoch,
    to_model_input,
)
from posetune.errors import ConfigError, DataError, TrainingDiverged
from posetune.train.checkpoint import load_checkpoint, save_checkpoint
from posetune.train.losses import get_orientation_loss, pose_loss
from posetune.train.metrics import pose_metrics
from posetune.train.model import create_model, use_sync_batchnorm

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
    """Where training stands: what a checkpoint restores besides weights and optimizer."""

    epoch: int = 0  # completed epochs
    batch: int = 0  # micro-batches done in the current epoch (a mid-epoch checkpoint)
    step: int = 0  # optimizer steps taken
    samples_seen: int = 0  # training samples consumed, all ranks together
    evaluated_at: int = 0  # samples_seen at the last evaluation
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None


@dataclass(frozen=True)
class Schedule:
    """When training ends and when it evaluates, fixed before the first step.

    Training ends after train.epochs, or at train.max_samples if that comes first (mid-epoch).
    It evaluates every val.eval_every_samples samples when that is set, else every
    val.eval_freq epochs, and always at the end. A search sets both sample counts, so that
    trials of every batch size are evaluated, and judged by ASHA, at the same sample counts.
    """

    batches_per_epoch: int  # micro-batches per epoch on each rank
    samples_per_batch: int  # one micro-batch on every rank together
    total_batches: int
    eval_every_samples: int | None
    eval_freq: int

    @classmethod
    def of(cls, cfg: Config, batches_per_epoch: int, samples_per_batch: int) -> Schedule:
        total = batches_per_epoch * cfg.train.epochs
        if cfg.train.max_samples is not None:
            total = min(total, math.ceil(cfg.train.max_samples / samples_per_batch))
        return cls(batches_per_epoch, samples_per_batch, total, cfg.val.eval_every_samples, cfg.val.eval_freq)

    @property
    def total_samples(self) -> int:
        return self.total_batches * self.samples_per_batch

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_batches / self.batches_per_epoch)

    def epoch_batches(self, epoch: int) -> int:
        """Micro-batches of this epoch that are trained (fewer in a last, cut-short epoch)."""
        return min(self.batches_per_epoch, self.total_batches - epoch * self.batches_per_epoch)

    def optimizer_steps(self, accumulation: int) -> int:
        """Accumulation groups restart at each epoch, so the last group of an epoch may be short."""
        full, rest = divmod(self.total_batches, self.batches_per_epoch)
        return full * math.ceil(self.batches_per_epoch / accumulation) + math.ceil(rest / accumulation)

    def evaluation_due(self, state: TrainState) -> bool:
        """After a micro-batch (state.batch == 0 right after an epoch's last one)."""
        if state.samples_seen >= self.total_samples:
            return True
        if self.eval_every_samples is not None:
            next_milestone = (state.evaluated_at // self.eval_every_samples + 1) * self.eval_every_samples
            return state.samples_seen >= next_milestone
        return state.batch == 0 and state.epoch % self.eval_freq == 0


DIVERGENCE_CHECK_STEPS = 16  # optimizer steps between reads of the loss on the host


@dataclass
class EpochLoss:
    """The epoch's loss sum and a "some loss was not finite" flag, kept on the device: nothing
    waits for the device in steady state; they are read when needed (``check``, ``mean``)."""

    total: torch.Tensor
    nonfinite: torch.Tensor
    batches: int = 0

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss
        self.nonfinite = torch.maximum(self.nonfinite, (~torch.isfinite(loss)).float())
        self.batches += 1

    def mean(self) -> float:
        return self.total.item() / max(1, self.batches)

    def check(self, rt: Runtime, state: TrainState) -> None:
        """Raise TrainingDiverged if any loss so far was inf/NaN. One host-device sync, and
        every rank agrees (all-reduced), so they stop together instead of one waiting in an
        all-reduce."""
        flag = self.nonfinite
        if rt.world_size > 1:
            flag = flag.clone()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item():
            raise TrainingDiverged(
                f"training diverged in epoch {state.epoch + 1} (loss {self.mean():g}); lower optimizer.lr",
                state.samples_seen,
            )


def train_batches(
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
    batches: int | None = None,
) -> Iterator[EpochLoss]:
    """Train on the epoch's batches from state.batch up to `batches` (default: all), yielding
    after each one so that the caller can evaluate mid-epoch. Gradient accumulation divides
    each micro-batch loss by its group's size, so an update equals that of one big batch;
    groups start at the epoch's first batch, so a resumed epoch groups its batches the same.
    After the last batch state.epoch has advanced and state.batch is 0.

    A diverging run stops within DIVERGENCE_CHECK_STEPS optimizer steps (16 x
    accumulation_steps batches), when the loss is read on the host."""
    from tqdm import tqdm

    model.train()
    batches, accumulate, first = batches or len(loader), cfg.train.accumulation_steps, state.batch
    loss = EpochLoss(torch.zeros((), device=rt.device), torch.zeros((), device=rt.device))
    start = time.perf_counter()
    bar = tqdm(
        total=batches,
        initial=first,
        desc=f"epoch {state.epoch + 1}/{cfg.train.epochs}",
        unit="batch",
        disable=not progress,
        leave=False,
        file=sys.stderr,
    )
    for i, (images, translations, quaternions) in enumerate(loader, start=first):
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
            batch_loss = pose_loss(translation, quaternion, translations, quaternions, cfg.train.beta_loss, loss_fn)
            scaler.scale(batch_loss / group_size).backward()
        state.samples_seen += len(images) * rt.world_size
        state.batch = i + 1
        loss.add(batch_loss.detach())
        bar.update()
        if last_in_group:
            _optimizer_step(model, optimizer, scaler, cfg, state, lr_for_step)
            if state.step % DIVERGENCE_CHECK_STEPS == 0 or state.batch == batches:
                loss.check(rt, state)
                if progress:
                    images_per_second = (i + 1 - first) * len(images) * rt.world_size / (time.perf_counter() - start)
                    bar.set_postfix(loss=f"{loss.mean():.4f}", img_s=f"{images_per_second:.0f}")
        if state.batch == batches:
            state.epoch, state.batch = state.epoch + 1, 0
            bar.close()
            yield loss
            return
        yield loss


def train_one_epoch(*args, **kwargs) -> float:
    """Train the rest of an epoch without stopping (``train_batches``' arguments); return its
    mean loss."""
    *_, loss = train_batches(*args, **kwargs)
    return loss.mean()


def _optimizer_step(model, optimizer, scaler, cfg: Config, state: TrainState, lr_for_step) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr_for_step(state.step)
    if cfg.optimizer.grad_clip_norm is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1


@torch.no_grad()
def predict_loader(model: nn.Module, loader, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Predictions for this rank's share of the loader, in loader order (on the CPU). The model
    is left in the mode it came in: an evaluation mid-epoch is followed by more training."""
    training = model.training
    model.eval()
    translations, quaternions = [], []
    for images, _, _ in loader:
        with rt.autocast():
            translation, quaternion = model(rt.inputs(images))
        translations.append(translation.float().cpu())
        if quaternion is not None:
            quaternions.append(quaternion.float().cpu())
    model.train(training)
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

    epoch: float  # epochs trained: a fraction for an evaluation mid-epoch
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

    schedule = Schedule.of(cfg, len(train_loader), cfg.train.batch_size * world_size)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.accumulation_steps)
    total_steps = schedule.optimizer_steps(cfg.train.accumulation_steps)
    warmup_steps = round(cfg.optimizer.warmup_epochs * steps_per_epoch)

    def lr_for_step(step: int) -> float:
        return lr_at(step, total_steps, warmup_steps, cfg.optimizer)

    def checkpoint_state() -> dict[str, Any]:
        """Every rank calls this (it gathers each rank's RNG state); rank 0 saves it."""
        rng = _rng_states(rt)
        mid_group = state.batch % cfg.train.accumulation_steps != 0
        return {
            "config": cfg.to_dict(),
            "model": _unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": state.epoch,
            "batch": state.batch,
            "step": state.step,
            "samples_seen": state.samples_seen,
            "evaluated_at": state.evaluated_at,
            "history": state.history,
            "best": state.best,
            "group_gradients": _group_gradients(_unwrap(model), rt) if mid_group else None,
            "rng": rng,  # one state per rank
        }

    checkpoints = out_dir / "checkpoints"
    since = (time.perf_counter(), state.samples_seen)  # training time and samples since the last evaluation

    def evaluate_and_save(train_loss: float) -> None:
        nonlocal since
        throughput = (state.samples_seen - since[1]) / (time.perf_counter() - since[0])
        metrics = evaluate(model, val_set, cfg.val.batch_size, rt)
        state.evaluated_at = state.samples_seen
        epoch = state.epoch if state.batch == 0 else round(state.epoch + state.batch / len(train_loader), 3)
        record = {"epoch": epoch, "samples_seen": state.samples_seen, "train_loss": train_loss, **metrics}
        record["train_images_per_s"] = throughput  # training throughput since the last evaluation, all ranks
        monitor = cfg.checkpoint.monitor
        best_value = None if state.best is None else state.best[monitor]
        is_best = better(metrics[monitor], best_value, metric_mode(monitor))
        state.history.append(record)
        state.best = record if is_best else state.best
        snapshot = checkpoint_state()
        if rank == 0:
            log.info("eval at %s samples (epoch %s): %s", f"{state.samples_seen:,}", epoch, format_metrics(metrics))
            save_checkpoint(snapshot, checkpoints / "last.pt")
            if is_best:
                save_checkpoint(snapshot, checkpoints / "best.pt")
            storage.write_text(
                out_dir / "metrics.json", json.dumps({"history": state.history, "best": state.best}, indent=2)
            )
        if on_evaluation:
            on_evaluation(
                Evaluation(epoch, state.samples_seen, metrics, is_best, checkpoints, out_dir, train_loss, throughput)
            )
        since = (time.perf_counter(), state.samples_seen)

    while state.epoch < schedule.epochs:
        set_epoch(train_loader, state.epoch, skip_batches=state.batch)
        epoch_start, epoch_samples = time.perf_counter(), state.samples_seen
        batches = schedule.epoch_batches(state.epoch)
        for loss in train_batches(
            step_model, train_loader, optimizer, scaler, loss_fn, rt, cfg, state, lr_for_step, progress, batches
        ):
            if schedule.evaluation_due(state):
                loss.check(rt, state)  # never evaluate (or report) a diverged model
                evaluate_and_save(loss.mean())
        if rank == 0:
            log.info(
                "epoch %d/%d  loss %.5f  lr %.2e  %.0f img/s",
                state.epoch,
                schedule.epochs,
                loss.mean(),
                lr_for_step(max(0, state.step - 1)),
                (state.samples_seen - epoch_samples) / (time.perf_counter() - epoch_start),
            )
        if state.evaluated_at != state.samples_seen and state.epoch % cfg.checkpoint.save_frequency == 0:
            snapshot = checkpoint_state()
            if rank == 0:
                save_checkpoint(snapshot, checkpoints / "last.pt")
    return FitResult(out_dir, state.best or {}, state.history)


def _group_gradients(model: nn.Module, rt: Runtime) -> list[torch.Tensor | None]:
    """The gradients of an unfinished accumulation group, for a checkpoint taken mid-group.

    Each rank's are replaced by the mean over ranks, in place: the group's update averages
    every rank's sum anyway (DDP, at the group's last batch), so training on, or resuming
    every rank from this one copy, gives the same update."""
    grads = []
    for p in model.parameters():
        if p.grad is not None and rt.world_size > 1:
            torch.distributed.all_reduce(p.grad)  # a sum: gloo has no average
            p.grad /= rt.world_size
        grads.append(None if p.grad is None else p.grad.detach().cpu())
    return grads


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
    if saved.get("group_gradients"):  # saved inside an accumulation group
        for p, grad in zip(model.parameters(), saved["group_gradients"], strict=True):
            p.grad = None if grad is None else grad.to(p.device)
    rng = saved["rng"]
    rng = rng if isinstance(rng, dict) else rng[rank] if rank < len(rng) else None  # per rank since v2
    if rng is not None:  # a rank the saved run did not have keeps its fresh seed
        _restore_rng(rng)
    return TrainState(
        epoch=saved["epoch"],
        batch=saved.get("batch", 0),  # since v3: mid-epoch checkpoints
        step=saved["step"],
        samples_seen=saved["samples_seen"],
        evaluated_at=saved.get("evaluated_at", saved["history"][-1]["samples_seen"] if saved["history"] else 0),
        history=saved["history"],
        best=saved["best"],
    )


def format_metrics(metrics: dict[str, float]) -> str:
    parts = [f"translation {metrics['translation_error_cm']:.2f} cm"]
    if "orientation_error_deg" in metrics:
        parts.append(f"orientation {metrics['orientation_error_deg']:.2f} deg")
        parts.append(f"within 2cm/5deg {metrics['within_2cm_5deg']:.1%}")
    parts.append(f"pose_error {metrics['pose_error']:.3f}")
    return ", ".join(parts)
