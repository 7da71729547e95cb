"""The decoded-image cache: a split's images decoded once into a uint8 file (N, H, W, 3)
keyed by the source files, the crop and the size, then memory-mapped, so that later epochs,
later runs and other trials on the same node read it through the page cache instead of
decoding PNGs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from posetune import storage
from posetune.data.perception import PoseIndex
from posetune.errors import DataError

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1  # bump when decoding or resizing changes


def decode_image(data: bytes, crop: Sequence[int] | None, size: tuple[int, int], where: str) -> np.ndarray:
    """PNG/JPEG bytes -> (H, W, 3) uint8: RGB, optional crop box, then resize to size (w, h)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{where}: cannot decode image ({exc})") from None
    image = image.convert("RGB")  # RGBA, greyscale and palette images alike
    if crop is not None:
        right, bottom = crop[2], crop[3]
        if right > image.width or bottom > image.height:
            raise DataError(f"dataset.crop {list(crop)} does not fit the {image.width}x{image.height} image {where}")
        image = image.crop(tuple(crop))
    if image.size != size:
        image = image.resize(size, Image.BILINEAR)
    return np.array(image)  # a writable copy (np.asarray of a PIL image is read-only)


class DecodedImages(Dataset):
    """Images decoded on demand (the cold path, and how the cache is built)."""

    def __init__(self, index: PoseIndex, crop: Sequence[int] | None, size: tuple[int, int]):
        self.index, self.crop, self.size = index, crop, size

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        name = self.index.images[i]
        return decode_image(self.index.source.read(name), self.crop, self.size, self.index.source.describe(name))


def cache_key(index: PoseIndex, crop: Sequence[int] | None, size: tuple[int, int]) -> str:
    """Changes with any image file (size + mtime, or zip CRC), the crop or the output size."""
    digest = hashlib.sha256()
    header = {"v": CACHE_FORMAT_VERSION, "source": index.source.describe(), "crop": crop, "size": size}
    digest.update(json.dumps(header).encode())
    for name in index.images:
        digest.update(f"{name}\0{index.source.fingerprint(name)}\n".encode())
    return digest.hexdigest()[:20]


def cached_images(
    index: PoseIndex,
    crop: Sequence[int] | None,
    size: tuple[int, int],
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """The split's decoded images as a read-only memory map (N, H, W, 3), built on first use.

    Concurrent callers on a node wait for one builder; the file appears atomically.
    """
    cache_dir = storage.local_path(cache_dir, "dataset.cache_dir") if cache_dir else storage.cache_root()
    cache_dir.mkdir(parents=True, exist_ok=True)
    width, height = size
    path = cache_dir / f"{cache_key(index, crop, size)}-{len(index)}x{width}x{height}.npy"
    if not path.exists():
        with storage.file_lock(path.with_suffix(".lock")):
            if not path.exists():  # another process may have built it while we waited
                _remove_leftovers(path)
                _build_cache(index, crop, size, path, num_workers, progress)
    return np.load(path, mmap_mode="r")


def _remove_leftovers(path: Path) -> None:
    """Half-written copies of `path` (storage.atomic_path's .NAME.*.tmp) of builders that were
    killed: only the lock holder writes them, so with the lock held every one is a leftover."""
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        log.info("removing %s, left by a process that was killed while it built the cache", leftover)
        leftover.unlink(missing_ok=True)


def _build_cache(index, crop, size, path: Path, num_workers: int, progress: bool) -> None:
    from tqdm import tqdm

    width, height = size
    log.info("caching %d images of %s at %dx%d in %s", len(index), index.source.describe(), width, height, path)
    with storage.atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(index), height, width, 3))
        loader = DataLoader(
            DecodedImages(index, crop, size),
            batch_size=64,
            num_workers=num_workers,
            collate_fn=np.stack,
        )
        start = 0
        with tqdm(total=len(index), desc="decoding", unit="img", disable=not progress, leave=False) as bar:
            for batch in loader:
                out[start : start + len(batch)] = batch
                start += len(batch)
                bar.update(len(batch))
        out.flush()
        del out
