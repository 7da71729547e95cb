"""From a Perception split to batches: fetch, decode, shard, shuffle.

Images come from the decoded-image cache (``data.cache``) or are decoded on demand. Batches
stay uint8 until they reach the device, where ``to_model_input`` scales and normalises them.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from posetune.config import Config
from posetune.data.cache import DecodedImages, cached_images
from posetune.data.fetch import fetch_dataset
from posetune.data.perception import PoseIndex, read_split
from posetune.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PoseDataset(Dataset):
    """Indexed by a *list* of sample indices (a whole batch at once): one slice of the memory
    map per batch instead of one Python call per image."""

    def __init__(self, index: PoseIndex, images: np.ndarray | DecodedImages):
        self.index = index
        self.images = images
        self.translations = torch.from_numpy(index.translations)
        self.quaternions = torch.from_numpy(index.quaternions)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(self.images, np.ndarray):
            order = np.sort(indices)  # monotone reads from the memory map
            images = torch.from_numpy(np.ascontiguousarray(self.images[order]))
            rows = torch.from_numpy(order)
        else:
            images = torch.from_numpy(np.stack([self.images[i] for i in indices]))
            rows = torch.as_tensor(indices)
        # (B, H, W, 3) uint8, (B, 3), (B, 4)
        return images, self.translations[rows], self.quaternions[rows]


def load_split(cfg: Config, split: str, sample_size: int = 0, progress: bool = False) -> PoseDataset:
    """A split of cfg.dataset.root as a PoseDataset (cached per cfg.dataset.cache)."""
    if cfg.dataset.root is None:
        raise DataError("dataset.root is not set: pass dataset.root=PATH (a folder with train/ and val/)")
    root = fetch_dataset(cfg.dataset.root, cfg.dataset.cache_dir)  # once per node for gs://
    index = read_split(root, split, cfg.estimator.label_name).head(sample_size)
    crop, size = cfg.dataset.crop, cfg.dataset.image_size
    workers = decode_workers(cfg)
    if cfg.dataset.cache:
        images = cached_images(index, crop, size, cfg.dataset.cache_dir, workers, progress)
    else:
        images = DecodedImages(index, crop, size)
    return PoseDataset(index, images)


def decode_workers(cfg: Config) -> int:
    if cfg.dataset.num_workers is not None:
        return cfg.dataset.num_workers
    return min(4, os.cpu_count() or 1)


def loader_workers(cfg: Config, device: torch.device) -> int:
    """Training DataLoader workers: dataset.loader_workers, or by default min(4, CPUs) when
    training on a GPU (decoding and copies then overlap the step on otherwise idle CPUs) and
    none on a CPU, where workers compete with the step for the same cores (measured by
    benchmarks/step.py on 2 cores: 6-12% slower, cached or decoding PNGs)."""
    if cfg.dataset.loader_workers is not None:
        return cfg.dataset.loader_workers
    return 0 if device.type == "cpu" else min(4, os.cpu_count() or 1)


def make_loader(
    dataset: PoseDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of this rank's share of the dataset. Training shuffles with torch's
    DistributedSampler (call ``set_epoch``); evaluation takes every world_size-th sample
    so that all ranks' predictions interleave back into dataset order without padding."""
    if shuffle:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
    else:
        sampler = range(rank, len(dataset), world_size)
    return DataLoader(
        dataset,
        sampler=ResumableBatches(sampler, batch_size, drop_last=drop_last),
        batch_size=None,  # the dataset returns whole batches
        num_workers=num_workers,
        pin_memory=pin_memory,  # page-locked batches: asynchronous (non_blocking) copies to the GPU
        persistent_workers=num_workers > 0,  # no worker start-up at every epoch
        prefetch_factor=4 if num_workers > 0 else None,  # batches ready ahead of the step
    )


class ResumableBatches(BatchSampler):
    """A BatchSampler that can start its next pass a number of batches in, so that a run
    resumed from a mid-epoch checkpoint trains on the rest of that epoch's order. Only indices
    are skipped: no skipped image is read. (torchdata's StatefulDataLoader does this too, for
    an extra dependency and a loader-state format of its own.)"""

    skip = 0  # batches to leave out of the next pass only

    def __iter__(self):
        batches, self.skip = itertools.islice(super().__iter__(), self.skip, None), 0
        return batches


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Reshuffle deterministically for this epoch (same order after a resume) and start the
    pass `skip_batches` batches in."""
    batches = loader.sampler
    batches.skip = skip_batches
    if isinstance(batches.sampler, DistributedSampler):
        batches.sampler.set_epoch(epoch)


def normalization(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as (1, 3, 1, 1) tensors on the device: made once per run, not per
    batch (a host-to-device copy each time)."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return mean, std


def to_model_input(
    images: torch.Tensor,
    device: torch.device,
    normalize: str,
    channels_last: bool,
    constants: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float on the device, scaled to [0, 1], optionally
    ImageNet-normalised (with `constants` from ``normalization``). Conversion happens after the
    copy, so only uint8 crosses the bus."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    if normalize == "imagenet":
        mean, std = constants or normalization(device)
        x = (x - mean) / std
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=memory_format)
