"""Checkpoints: one dict per file, written atomically, read with ``weights_only=True``.

A checkpoint holds everything a run needs to continue exactly where it stopped (model,
optimizer, grad scaler, epoch, optimizer step, samples seen, RNG states, metric history, best
value) plus the fully resolved config, so evaluate/predict need nothing else. A weights
checkpoint (``weights_only``: a run's best.pt, a search's best model, an MLflow run's
checkpoint) keeps ``WEIGHTS_KEYS`` only, about a third of the file.
"""

from __future__ import annotations

import io
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from posetune import storage
from posetune.errors import CheckpointError, PosetuneError

FORMAT = "posetune-checkpoint"
VERSION = 2  # 2: "rng" holds one state per rank


# What a weights checkpoint keeps: the weights and the config that rebuilds the model (all that
# `posetune evaluate` / `predict --checkpoint` read) and where training stood. The optimizer,
# grad-scaler and RNG states, about two thirds of a full checkpoint, only resume training,
# which reads last.pt.
WEIGHTS_KEYS = ("config", "model", "epoch", "step", "samples_seen", "history", "best")


def weights_only(state: dict[str, Any]) -> dict[str, Any]:
    """The part of a checkpoint that evaluating or predicting reads."""
    return {key: state[key] for key in WEIGHTS_KEYS if key in state}


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buffer)
    storage.write_bytes(path, buffer.getvalue())


def load_checkpoint(uri: str | Path, sha256: str | None = None) -> dict[str, Any]:
    """A checkpoint from a path or URI (gs://, http(s)://, optionally checked against a SHA-256),
    on the CPU. Only tensors and plain containers are unpickled (weights_only), so a checkpoint
    from elsewhere cannot run code. A remote one is streamed to a temporary file first: a
    multi-GiB checkpoint is never held in memory twice (its bytes and the tensors)."""
    with ExitStack() as stack:
        try:
            path = stack.enter_context(storage.local_copy(uri, sha256))
        except PosetuneError as exc:
            raise CheckpointError(f"checkpoint {uri}: {exc}") from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for truncated, foreign or corrupted files
            raise CheckpointError(f"checkpoint {uri} cannot be read: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{uri} is not a posetune checkpoint")
    return state
