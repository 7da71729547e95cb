"""Whole datasets: check every split, push a local dataset to a bucket, generate one there.

Reading one split into an index is `posetune.perception`; turning it into batches is
`posetune.data`. This module works on a dataset as a user hands it over (`posetune data ...`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from posetune import storage
from posetune.errors import DataError, StorageError
from posetune.data.fetch import fetch_dataset
from posetune.data.perception import PoseIndex, read_split

log = logging.getLogger(__name__)


def check_dataset(root: str, splits: Sequence[str], label: str) -> dict[str, PoseIndex]:
    """Every split's validated index (a gs:// dataset is fetched into the node's cache first)."""
    local = fetch_dataset(root)
    return {split: read_split(local, split, label) for split in splits}


def present_splits(root: Path) -> list[str]:
    """The split folders a local dataset folder holds (train, val, test), in that order."""
    return [name for name in ("train", "val", "test") if (root / name).is_dir()]


def push_dataset(
    source: str,
    destination: str,
    label: str = "cube_position",
    overwrite: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, PoseIndex], int]:
    """Validate a local dataset folder, then upload it: as a folder of split folders, or zipped
    first when the destination ends in .zip. Returns (the checked splits, bytes uploaded).
    Nothing is uploaded unless every split reads cleanly."""
    root = storage.local_path(source, "the dataset to push")
    if not root.is_dir():
        raise DataError(f"{root} is not a dataset folder (it must hold train/ and val/ split folders)")
    splits = present_splits(root)
    if "train" not in splits:
        raise DataError(f"{root} has no train/ split folder; `posetune data check {root}` shows what it holds")
    indexes = {split: read_split(root, split, label) for split in splits}
    if storage.exists(destination) and not overwrite:
        raise StorageError(f"{destination} already exists; pass --overwrite to replace it")
    if destination.lower().endswith(".zip"):
        with tempfile.TemporaryDirectory(prefix="posetune-push-") as folder:
            archive = Path(folder, storage.name_of(destination))
            zip_folder(root, splits, archive)
            storage.backend(destination).upload(archive, destination)
            size = archive.stat().st_size
            if on_progress:
                on_progress(size)
            return indexes, size
    if overwrite:
        storage.remove_tree(destination)
    sent = 0
    for split in splits:
        sent += storage.upload_tree(root / split, storage.join(destination, split), on_progress)
    return indexes, sent


def zip_folder(root: Path, splits: Sequence[str], archive: Path) -> None:
    """The split folders in one zip (stored: PNGs are already compressed)."""
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as out:
        for split in splits:
            for folder, _, names in os.walk(root / split):
                for name in sorted(names):
                    path = Path(folder, name)
                    out.write(path, path.relative_to(root).as_posix())


def folder_size(root: Path, splits: Sequence[str]) -> int:
    walks = [os.walk(root / split) for split in splits]
    return sum(Path(folder, name).stat().st_size for walk in walks for folder, _, names in walk for name in names)
