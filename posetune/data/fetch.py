"""Datasets at a remote location (``gs://``, ``https://``): one local copy per node.

A dataset is downloaded once into ``<cache>/datasets/``, keyed by every object's version, so
that the trials and workers on a node share it and the readers in ``perception`` only ever see
local files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path

from posetune import storage
from posetune.errors import DataError

log = logging.getLogger(__name__)


def fetch_dataset(uri: str, cache_dir: str | Path | None = None) -> Path:
    """A local path holding the dataset at uri (a folder of split folders, or a .zip).

    Local paths are returned as they are. Remote ones are downloaded once per node into
    ``<cache>/datasets/``, keyed by every object's generation: a changed object is fetched
    again, an unchanged one never is. A file lock makes concurrent trials on a node wait for
    one download, and the copy appears (renamed into place) only when it is complete.
    """
    if storage.is_local(uri):
        return storage.LocalStorage.path(uri)
    files = storage.list_files(uri)
    if not files:
        raise DataError(f"dataset.root {uri} does not exist (no object or folder of that name)")
    root = Path(cache_dir) if cache_dir else storage.cache_root()
    digest = hashlib.sha256(uri.encode())
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]}\n".encode())
    target = root / "datasets" / f"{storage.name_of(uri)}-{digest.hexdigest()[:16]}"
    complete = target / ".complete"
    if not complete.exists():
        with storage.file_lock(target.with_name(target.name + ".lock")):
            if not complete.exists():  # another process may have fetched it while we waited
                _download_all(uri, files, target)
    return target / storage.name_of(uri) if "" in files else target


def _download_all(uri: str, files: dict[str, str], target: Path) -> None:
    log.info("fetching %s (%d file(s)) into %s", uri, len(files), target)
    store = storage.backend(uri)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        for name in files:
            destination = partial / (name or storage.name_of(uri))
            store.download(storage.join(uri, name) if name else uri, destination)
        (partial / ".complete").write_text(uri + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
