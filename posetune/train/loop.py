"""The training loop: ``fit(cfg)`` sets up, then trains (``train_batches``), evaluates when the
``Schedule`` says so (``evaluate``), checkpoints, and stops when the schedule ends.

No globals: device, rank and world size come in as arguments, so a Ray Train worker (or any
launcher that has set up torch.distributed) calls ``fit`` directly. Rank 0 writes the run
folder; every rank trains and evaluates its shard.

Run folder (``system.out_dir``):
    config.yaml            the fully resolved config
    checkpoints/last.pt    every ``save_frequency`` epochs and at every evaluation (mid-epoch too)
    checkpoints/best.pt    the evaluation with the best ``checkpoint.monitor`` value, weights only
    metrics.json           {"history": [per evaluation], "best": {...}}

The device and precision are in ``train.runtime``, the learning rate and the schedule of
evaluations in ``train.schedule``, what a checkpoint holds to resume exactly in ``train.resume``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from posetune import storage
from posetune.choices import better, metric_mode
from posetune.config import Config
from posetune.data.loader import PoseDataset, load_split, loader_workers, make_loader, set_epoch
from posetune.errors import ConfigError, DataError, TrainingDiverged
from posetune.train.checkpoint import save_checkpoint, weights_only
from posetune.train.losses import get_orientation_loss, pose_loss
from posetune.train.metrics import pose_metrics
from posetune.train.model import PoseNet, create_model, use_sync_batchnorm
from posetune.train.resume import TrainState, checkpoint_state, resume
from posetune.train.runtime import Runtime, autocast_dtype, resolve_device
from posetune.train.schedule import Schedule

log = logging.getLogger(__name__)

# (B, H, W, 3) uint8 images, (B, 3) translations, (B, 4) unit quaternions
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


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
    train_images_per_s: float  # training throughput since the last evaluation, all ranks together

    @property
    def record(self) -> dict[str, Any]:
        """The evaluation as metrics.json's history holds it (and ``FitResult.history``)."""
        return {
            "epoch": self.epoch,
            "samples_seen": self.samples_seen,
            "train_loss": self.train_loss,
            **self.metrics,
            "train_images_per_s": self.train_images_per_s,
        }


@dataclass
class FitResult:
    out_dir: Path
    best: dict[str, Any]
    history: list[dict[str, Any]]


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

    model = _create_model(cfg, rt)
    optimizer, scaler = _optimizer(cfg, model, rt)
    train_set, val_set = _read_splits(cfg, rt, progress)
    if rank == 0:  # the run folder appears once the data has been read: a user error leaves none
        storage.write_text(out_dir / "config.yaml", cfg.to_yaml())
    train_loader = _train_loader(cfg, train_set, rt)
    model.set_translation_stats(train_set.translations.to(device))
    state = _initial_state(cfg, model, optimizer, scaler, rank)
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    schedule = Schedule.of(cfg, len(train_loader), cfg.train.batch_size * world_size)
    compiled = torch.compile(model) if cfg.train.compile else None  # the same weights: state_dict() stays model's
    loss_fn = get_orientation_loss(cfg.loss.orientation)
    step = Step(model, optimizer, scaler, loss_fn, rt, cfg, schedule.learning_rate(cfg), compiled)

    since = (time.perf_counter(), state.samples_seen)  # training time and samples since the last evaluation
    while state.epoch < schedule.epochs:
        set_epoch(train_loader, state.epoch, skip_batches=state.batch)
        epoch_start = (time.perf_counter(), state.samples_seen)
        for loss in train_batches(step, train_loader, state, schedule.epoch_batches(state.epoch), progress):
            if not schedule.evaluation_due(state):
                continue
            loss.check(rt, state)  # never evaluate (or report) a diverged model
            throughput = _images_per_s(since, state.samples_seen)  # training only: taken before evaluating
            evaluation = _evaluate(step, val_set, state, schedule, loss.mean(), throughput, out_dir)
            _save_evaluation(step, state, evaluation)
            if on_evaluation:
                on_evaluation(evaluation)
            since = (time.perf_counter(), state.samples_seen)
        if rank == 0:
            log.info(
                "epoch %d/%d  loss %.5f  lr %.2e  %.0f img/s",
                state.epoch,
                schedule.epochs,
                loss.mean(),
                step.lr(max(0, state.step - 1)),
                _images_per_s(epoch_start, state.samples_seen),
            )
        if state.evaluated_at != state.samples_seen and state.epoch % cfg.checkpoint.save_frequency == 0:
            _save(step, state, out_dir / "checkpoints" / "last.pt")
    return FitResult(out_dir, state.best or {}, state.history)


# --- Setting up -------------------------------------------------------------------------------


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


def _create_model(cfg: Config, rt: Runtime) -> PoseNet:
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = create_model(cfg.model, cfg.dataset.symmetric).to(rt.device)
    if cfg.model.sync_batchnorm and rt.world_size > 1:
        model = use_sync_batchnorm(model, rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if rt.rank > 0:  # each rank its own random stream (dropout, stochastic depth); rank 0 keeps cfg.seed's
        random.seed(cfg.seed + rt.rank)
        torch.manual_seed(cfg.seed + rt.rank)
    return model


def _optimizer(cfg: Config, model: nn.Module, rt: Runtime) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler]:
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=cfg.optimizer.lr,
        betas=(cfg.optimizer.beta_1, cfg.optimizer.beta_2),
        weight_decay=cfg.optimizer.weight_decay,
        fused=True if cfg.optimizer.fused and rt.device.type == "cuda" else None,
    )
    return optimizer, torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)


def _read_splits(cfg: Config, rt: Runtime, progress: bool) -> tuple[PoseDataset, PoseDataset]:
    train_set = load_split(cfg, cfg.dataset.train_split, cfg.train.sample_size, progress)
    val_set = load_split(cfg, cfg.dataset.val_split, cfg.val.sample_size, progress)
    if len(train_set) < cfg.train.batch_size * rt.world_size:
        raise DataError(
            f"the training split has {len(train_set)} samples, fewer than one batch "
            f"(train.batch_size {cfg.train.batch_size} x {rt.world_size} workers)"
        )
    return train_set, val_set


def _train_loader(cfg: Config, train_set: PoseDataset, rt: Runtime) -> torch.utils.data.DataLoader:
    return make_loader(
        train_set,
        cfg.train.batch_size,
        shuffle=cfg.train.shuffle,
        seed=cfg.seed,
        rank=rt.rank,
        world_size=rt.world_size,
        drop_last=True,
        num_workers=loader_workers(cfg, rt.device),
        pin_memory=rt.device.type == "cuda",
    )


def _initial_state(
    cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, rank: int
) -> TrainState:
    """A fresh start, or where checkpoint.resume stopped (its weights loaded into model)."""
    if not cfg.checkpoint.resume:
        if not cfg.model.pretrained_weights and rank == 0:
            log.info("model.pretrained_weights is not set: %s starts from random initialisation", cfg.model.backbone)
        return TrainState()
    state = resume(cfg.checkpoint.resume, model, optimizer, scaler, rank)
    log.info("resumed from %s at epoch %d (%d samples seen)", cfg.checkpoint.resume, state.epoch, state.samples_seen)
    return state


# --- The training step ------------------------------------------------------------------------


@dataclass
class Step:
    """What a training step needs, fixed for the whole run: the model, its optimizer and loss,
    and the learning rate of each optimizer step."""

    model: nn.Module  # evaluated and checkpointed; DDP-wrapped on several ranks
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # orientation loss, see train.losses
    rt: Runtime
    cfg: Config
    lr: Callable[[int], float]  # optimizer step -> learning rate
    compiled: nn.Module | None = None  # torch.compile(model) (train.compile): trained in model's place


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
    step: Step,
    loader: Iterable[Batch],
    state: TrainState,
    batches: int | None = None,
    progress: bool = False,
) -> Iterator[EpochLoss]:
    """Train on the epoch's batches from state.batch up to `batches` (default: all, len(loader)),
    yielding after each one so that the caller can evaluate mid-epoch. Gradient accumulation
    divides each micro-batch loss by its group's size, so an update equals that of one big
    batch; groups start at the epoch's first batch, so a resumed epoch groups its batches the
    same. After the last batch state.epoch has advanced and state.batch is 0.

    A diverging run stops within DIVERGENCE_CHECK_STEPS optimizer steps (16 x
    accumulation_steps batches), when the loss is read on the host."""
    from tqdm import tqdm

    rt, cfg = step.rt, step.cfg
    model = step.model if step.compiled is None else step.compiled
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
        # DDP all-reduces gradients only on the group's last backward. step.model, not model:
        # a compiled model wraps the DDP module and is not one itself.
        sync = (
            step.model.no_sync()
            if isinstance(step.model, DistributedDataParallel) and not last_in_group
            else contextlib.nullcontext()
        )
        with sync:
            with rt.autocast():
                translation, quaternion = model(rt.inputs(images))
            batch_loss = pose_loss(
                translation, quaternion, translations, quaternions, cfg.train.beta_loss, step.loss_fn
            )
            step.scaler.scale(batch_loss / group_size).backward()
        state.samples_seen += len(images) * rt.world_size
        state.batch = i + 1
        loss.add(batch_loss.detach())
        bar.update()
        if last_in_group:
            _optimizer_step(step, model, state)
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


def train_one_epoch(step: Step, loader: Iterable[Batch], state: TrainState, progress: bool = False) -> float:
    """Train the rest of an epoch without stopping; return its mean loss."""
    *_, loss = train_batches(step, loader, state, progress=progress)
    return loss.mean()


def _optimizer_step(step: Step, model: nn.Module, state: TrainState) -> None:
    for group in step.optimizer.param_groups:
        group["lr"] = step.lr(state.step)
    if step.cfg.optimizer.grad_clip_norm is not None:
        step.scaler.unscale_(step.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), step.cfg.optimizer.grad_clip_norm)
    step.scaler.step(step.optimizer)
    step.scaler.update()
    step.optimizer.zero_grad(set_to_none=True)
    state.step += 1


# --- Evaluation -------------------------------------------------------------------------------


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


# --- Evaluating and checkpointing -------------------------------------------------------------


def _evaluate(
    step: Step,
    val_set: PoseDataset,
    state: TrainState,
    schedule: Schedule,
    train_loss: float,
    train_images_per_s: float,
    out_dir: Path,
) -> Evaluation:
    """Evaluate the model on the validation split and add the result to state's history."""
    metrics = evaluate(step.model, val_set, step.cfg.val.batch_size, step.rt)
    state.evaluated_at = state.samples_seen
    monitor = step.cfg.checkpoint.monitor
    is_best = better(metrics[monitor], None if state.best is None else state.best[monitor], metric_mode(monitor))
    evaluation = Evaluation(
        schedule.epochs_trained(state),
        state.samples_seen,
        metrics,
        is_best,
        out_dir / "checkpoints",
        out_dir,
        train_loss,
        train_images_per_s,
    )
    state.history.append(evaluation.record)
    state.best = state.history[-1] if is_best else state.best
    if step.rt.rank == 0:
        log.info(
            "eval at %s samples (epoch %s): %s", f"{state.samples_seen:,}", evaluation.epoch, format_metrics(metrics)
        )
    return evaluation


def _save_evaluation(step: Step, state: TrainState, evaluation: Evaluation) -> None:
    """last.pt, best.pt (weights only: a third of the bytes a search uploads at every report
    for it) when this evaluation is the best so far, and metrics.json."""
    checkpoints = evaluation.checkpoint_dir
    _save(step, state, checkpoints / "last.pt", best=checkpoints / "best.pt" if evaluation.is_best else None)
    if step.rt.rank == 0:
        history = {"history": state.history, "best": state.best}
        storage.write_text(evaluation.out_dir / "metrics.json", json.dumps(history, indent=2))


def _save(step: Step, state: TrainState, path: Path, best: Path | None = None) -> None:
    """Every rank takes part (the checkpoint gathers their RNG states); rank 0 writes path, and
    its weights to best when given."""
    snapshot = checkpoint_state(step.cfg, step.model, step.optimizer, step.scaler, state, step.rt)
    if step.rt.rank == 0:
        save_checkpoint(snapshot, path)
        if best is not None:
            save_checkpoint(weights_only(snapshot), best)


def _images_per_s(since: tuple[float, int], samples_seen: int) -> float:
    """Training samples per second (all ranks together) since (time.perf_counter(), samples_seen)."""
    start, samples = since
    return (samples_seen - samples) / (time.perf_counter() - start)


def format_metrics(metrics: dict[str, float]) -> str:
    parts = [f"translation {metrics['translation_error_cm']:.2f} cm"]
    if "orientation_error_deg" in metrics:
        parts.append(f"orientation {metrics['orientation_error_deg']:.2f} deg")
        parts.append(f"within 2cm/5deg {metrics['within_2cm_5deg']:.1%}")
    parts.append(f"pose_error {metrics['pose_error']:.3f}")
    return ", ".join(parts)
