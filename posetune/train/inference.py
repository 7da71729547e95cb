"""Using a trained model: metrics on a split, predictions for image files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from posetune import storage
from posetune.config import Config, config_from_dict
from posetune.data.cache import decode_image
from posetune.data.loader import load_split
from posetune.errors import CheckpointError, DataError, StorageError
from posetune.train.checkpoint import load_checkpoint
from posetune.train.loop import evaluate
from posetune.train.model import PoseNet, create_model
from posetune.train.runtime import Runtime, autocast_dtype, resolve_device


def model_from_checkpoint(uri: str | Path, sha256: str | None = None) -> tuple[PoseNet, Config]:
    """The checkpoint's model (CPU, eval mode) and the config it was trained with."""
    saved = load_checkpoint(uri, sha256)
    cfg = config_from_dict(saved["config"])
    # The weights come from the checkpoint; the original pretrained file need not exist here.
    model = create_model(cfg.model.model_copy(update={"pretrained_weights": None}), cfg.dataset.symmetric)
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {uri} does not match its own config: {str(exc).splitlines()[0]}") from None
    return model.eval(), cfg


def _runtime(cfg: Config, device: str | None) -> Runtime:
    resolved = resolve_device(device or "auto")
    return Runtime(resolved, amp_dtype=autocast_dtype(cfg.precision, resolved), normalize=cfg.dataset.normalize)


def evaluate_checkpoint(
    uri: str | Path,
    data: str | None = None,
    split: str = "val",
    device: str | None = None,
    sha256: str | None = None,
) -> tuple[dict[str, float], int]:
    """(metrics, number of samples) of a checkpoint on a split of its dataset (or of `data`)."""
    model, cfg = model_from_checkpoint(uri, sha256)
    if data is not None:
        cfg.dataset.root = data
    split_name = {
        "train": cfg.dataset.train_split,
        "val": cfg.dataset.val_split,
        "test": cfg.dataset.test_split,
    }[split]
    batch = cfg.test.batch_size if split == "test" else cfg.val.batch_size
    sample_size = {"val": cfg.val.sample_size, "test": cfg.test.sample_size}.get(split, 0)
    dataset = load_split(cfg, split_name, sample_size)
    rt = _runtime(cfg, device)
    return evaluate(model.to(rt.device), dataset, batch, rt), len(dataset)


@torch.no_grad()
def predict_images(model: PoseNet, cfg: Config, paths: Sequence[str | Path], device: str | None = None) -> list[dict]:
    """One {"image", "translation": [x, y, z], "quaternion": [x, y, z, w]} per image file."""
    rt = _runtime(cfg, device)
    model = model.to(rt.device).eval()
    results = []
    for path in paths:
        try:
            data = storage.read_bytes(path)  # a local file, gs:// or http(s)://
        except StorageError as exc:
            raise DataError(f"image {exc}") from None
        pixels = decode_image(data, cfg.dataset.crop, cfg.dataset.image_size, str(path))
        with rt.autocast():
            translation, quaternion = model(rt.inputs(torch.from_numpy(pixels)[None]))
        results.append(
            {
                "image": str(path),
                "translation": [round(v, 6) for v in translation[0].float().tolist()],
                "quaternion": None if quaternion is None else [round(v, 6) for v in quaternion[0].float().tolist()],
            }
        )
    return results
