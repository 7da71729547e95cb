"""Continuing a run exactly where it stopped: what a checkpoint holds besides weights and
optimizer (``TrainState``), every rank's RNG state, and the gradients of an unfinished
accumulation group.

``checkpoint_state`` builds the checkpoint (every rank calls it: it gathers their RNG states),
``resume`` reads it back; ``train.checkpoint`` writes and reads the file. A resumed run ends
bit-identical to one that was never interrupted, from an epoch's end or from inside an epoch.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from posetune.config import Config
from posetune.errors import ConfigError
from posetune.train.checkpoint import load_checkpoint
from posetune.train.runtime import Runtime, unwrap

log = logging.getLogger(__name__)


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


def checkpoint_state(
    cfg: Config,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    rt: Runtime,
) -> dict[str, Any]:
    """Every rank calls this (it gathers each rank's RNG state); rank 0 saves it."""
    rng = _rng_states(rt)
    mid_group = state.batch % cfg.train.accumulation_steps != 0
    return {
        "config": cfg.to_dict(),
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": state.epoch,
        "batch": state.batch,
        "step": state.step,
        "samples_seen": state.samples_seen,
        "evaluated_at": state.evaluated_at,
        "history": state.history,
        "best": state.best,
        "group_gradients": _group_gradients(unwrap(model), rt) if mid_group else None,
        "rng": rng,  # one state per rank
    }


def resume(
    path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, rank: int = 0
) -> TrainState:
    """Load path's weights, optimizer and scaler state (and an unfinished group's gradients)
    into the objects given, restore this rank's RNG state, and return where training stood."""
    saved = load_checkpoint(path)
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as exc:
        backbone = saved["config"]["model"]["backbone"]
        first_line = str(exc).splitlines()[0]
        raise ConfigError(f"checkpoint.resume {path} holds a different model ({backbone}): {first_line}") from None
    if "optimizer" not in saved:  # best.pt, a search's best model, an MLflow run's checkpoint
        raise ConfigError(
            f"checkpoint.resume {path} holds weights only (a best.pt or a search's best model): resume "
            "from a full checkpoint, the run folder's checkpoints/last.pt or a trial's last.pt"
        )
    optimizer.load_state_dict(saved["optimizer"])
    scaler.load_state_dict(saved["scaler"])
    if saved.get("group_gradients"):  # saved inside an accumulation group
        for p, grad in zip(model.parameters(), saved["group_gradients"], strict=True):
            p.grad = None if grad is None else grad.to(p.device)
    rng = saved["rng"]
    rng = rng if isinstance(rng, dict) else rng[rank] if rank < len(rng) else None  # per rank since v2
    if rng is not None:  # a rank the saved run did not have keeps its fresh seed
        _restore_rng(rng, next(model.parameters()).device)
    return TrainState(
        epoch=saved["epoch"],
        batch=saved.get("batch", 0),  # since v3: mid-epoch checkpoints
        step=saved["step"],
        samples_seen=saved["samples_seen"],
        evaluated_at=saved.get("evaluated_at", saved["history"][-1]["samples_seen"] if saved["history"] else 0),
        history=saved["history"],
        best=saved["best"],
    )


def _rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG state. CUDA's is its own device's only (``cuda_device``): Ray Train gives
    co-located workers all of a node's GPUs, so a list of every visible GPU's state would not fit
    a restart on another GPU layout."""
    return {
        "torch": torch.get_rng_state(),
        "cuda_device": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": list(random.getstate()[1]),
    }


def _rng_states(rt: Runtime) -> list[dict[str, Any]]:
    """Every rank's RNG state (gathered to all ranks), so that a resumed multi-worker run
    continues each rank's own random stream."""
    if rt.world_size == 1:
        return [_rng_state(rt.device)]
    states: list[Any] = [None] * rt.world_size
    torch.distributed.all_gather_object(states, _rng_state(rt.device))
    return states


def _restore_rng(rng: dict[str, Any], device: torch.device) -> None:
    """Restore what fits this process: its device's CUDA state where one was saved (checkpoints
    before the per-device state saved every visible GPU's, restored only on the same count)."""
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        if rng.get("cuda_device") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda_device"], device)
        elif rng.get("cuda") and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        elif rng.get("cuda"):
            log.warning(
                "the checkpoint's CUDA RNG states are for %d GPU(s), this process sees %d: CUDA keeps its fresh seed",
                len(rng["cuda"]),
                torch.cuda.device_count(),
            )
    random.setstate((3, tuple(rng["python"]), None))


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
