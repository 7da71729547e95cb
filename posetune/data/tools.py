"""Whole datasets: check every split, push a local dataset to a bucket, synthesize one (locally
or straight into a bucket).

Reading one split into an index is `data.perception`; turning it into batches is `data.loader`.
This module works on a dataset as a user hands it over (`posetune data ...`, a search's
`base.synthetic`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from posetune import storage
from posetune.data.fetch import fetch_dataset
from posetune.data.perception import PoseIndex, read_split
from posetune.errors import DataError, StorageError

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
    """Validate a local dataset folder, then upload it to a bucket: as a folder of split
    folders, or zipped first when the destination ends in .zip. Returns (the checked splits,
    bytes uploaded). Nothing is uploaded unless every split reads cleanly."""
    check_push_destination(destination)
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


def check_push_destination(destination: str) -> None:
    """`push` is the upload to a bucket: a local DEST (or a typo such as gs:/b/x, which is a
    local path) would quietly make a local folder, and https:// is read only."""
    if storage.is_local(destination) or storage.backend(destination).read_only:
        raise StorageError(
            f"DEST {destination} is not a bucket location: push uploads to gs://BUCKET/PATH/ or "
            "gs://BUCKET/PATH.zip (to copy a dataset locally, use cp -r)"
        )


def check_synthesis(root: str, splits: dict[str, int], overwrite: bool = False) -> None:
    """Refuse a synthesis before any rendering: negative counts, existing local splits, or a
    bucket destination that already holds something (unless `overwrite`)."""
    from posetune.data.synth import check_output

    if storage.is_local(root):
        check_output(storage.local_path(root, "OUT"), splits, overwrite)
        return
    if storage.exists(root) and not overwrite:
        raise StorageError(f"{root} already exists; pass --overwrite to replace it")
    # A bucket's splits are rendered into an empty scratch folder: only the counts can be wrong.
    check_output(Path(tempfile.gettempdir()), splits, overwrite=True)


def synthesize(
    root: str,
    splits: dict[str, int],
    seed: int = 0,
    *,
    workers: int | None = None,
    camera_jitter: bool = True,
    overwrite: bool = False,
    on_progress: Callable[[int], None] | None = None,
    push: Callable[[str, str], None] | None = None,
) -> list[str]:
    """Render the synthetic scene's splits (name -> frames) into `root`; return the splits written.

    A local root is written in place (each split appears complete or not at all). A bucket gets
    them through a scratch folder that is then pushed as a whole: ``push(scratch, root)``, by
    default ``push_dataset`` (which checks every split before uploading). `overwrite` replaces
    existing local splits, or whatever the bucket destination holds."""
    from posetune.data.synth import generate

    check_synthesis(root, splits, overwrite)
    if storage.is_local(root):
        return list(
            generate(storage.local_path(root, "OUT"), splits, seed, workers, camera_jitter, overwrite, on_progress)
        )
    with tempfile.TemporaryDirectory(prefix="posetune-synth-") as scratch:
        written = list(generate(Path(scratch), splits, seed, workers, camera_jitter, overwrite, on_progress))
        if push is None:
            push_dataset(scratch, root, overwrite=overwrite)
        else:
            push(scratch, root)
    return written


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
