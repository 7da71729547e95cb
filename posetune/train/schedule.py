"""When things happen in a run: the learning rate at each optimizer step, when training ends
and when it evaluates.

The learning-rate schedules are a registry, chosen by name in YAML (``optimizer.schedule``):
add one to ``SCHEDULES`` and its name to ``posetune.choices.SCHEDULES``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from posetune.config import Config, OptimizerConfig

if TYPE_CHECKING:
    from posetune.train.resume import TrainState

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

    def learning_rate(self, cfg: Config) -> Callable[[int], float]:
        """Optimizer step -> learning rate: warm-up over optimizer.warmup_epochs, then
        optimizer.schedule down to the last step of the run."""
        accumulation = cfg.train.accumulation_steps
        steps_per_epoch = math.ceil(self.batches_per_epoch / accumulation)
        return functools.partial(
            lr_at,
            total_steps=self.optimizer_steps(accumulation),
            warmup_steps=round(cfg.optimizer.warmup_epochs * steps_per_epoch),
            cfg=cfg.optimizer,
        )

    def epochs_trained(self, state: TrainState) -> float:
        """Epochs done: a fraction (to 3 places) inside an epoch."""
        return state.epoch if state.batch == 0 else round(state.epoch + state.batch / self.batches_per_epoch, 3)

    def evaluation_due(self, state: TrainState) -> bool:
        """After a micro-batch (state.batch == 0 right after an epoch's last one)."""
        if state.samples_seen >= self.total_samples:
            return True
        if self.eval_every_samples is not None:
            next_milestone = (state.evaluated_at // self.eval_every_samples + 1) * self.eval_every_samples
            return state.samples_seen >= next_milestone
        return state.batch == 0 and state.epoch % self.eval_freq == 0
