"""Datasets at a remote location (``gs://``, ``https://``): one local copy per node.

Each dataset URI has one folder in ``<cache>/datasets/``, holding one complete copy per
version (a version: every object's name and generation). A new version downloads only the
objects that changed since the newest copy (the others are hard links to it), every download
pinned to the generation the listing gave, so a copy never mixes two versions of an object.
A copy that no process on the node still uses is removed once a newer one is complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import IO

from posetune import storage
from posetune.errors import DataError, StorageChanged

log = logging.getLogger(__name__)

COMPLETE = ".complete"  # in a copy: its manifest ({"uri", "files": {name: version}}), written last
ATTEMPTS = 3  # listings tried while objects keep changing under the fetch (a push in progress)

# This process's shared locks on the copies it returned, held until it exits: a copy is removed
# only when no process holds one (a trial reading an older copy keeps it; the kernel drops the
# lock of a killed process).
_in_use: dict[Path, IO[str]] = {}


def fetch_dataset(uri: str, cache_dir: str | Path | None = None) -> Path:
    """A local path holding the dataset at uri (a folder of split folders, or a .zip).

    Local paths are returned as they are. Remote ones are downloaded once per node into
    ``<cache>/datasets/``: a changed object is fetched again, an unchanged one never is. A file
    lock makes concurrent trials on a node wait for one download, and a copy appears (renamed
    into place) only when it is complete. An https:// dataset has no version to compare (a
    server's ETag is optional), so it is fetched once per URL.
    """
    if storage.is_local(uri):
        return storage.LocalStorage.path(uri)
    root = Path(cache_dir) if cache_dir else storage.cache_root()
    folder = root / "datasets" / f"{storage.name_of(uri)}-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"
    for attempt in range(1, ATTEMPTS + 1):
        files = storage.list_files(uri)
        if not files:
            raise DataError(f"dataset.root {uri} does not exist (no object or folder of that name)")
        copy = folder / _version(files)
        with storage.file_lock(folder / ".lock"):
            try:
                if not (copy / COMPLETE).exists():  # another process may have fetched it while we waited
                    _fetch_version(uri, files, folder, copy)
            except StorageChanged as exc:
                log.warning("%s changed while it was fetched (%s); listing again (%d/%d)", uri, exc, attempt, ATTEMPTS)
                continue
            _hold(copy)
            _remove_superseded(folder, copy)
        return copy / storage.name_of(uri) if "" in files else copy
    raise DataError(
        f"dataset.root {uri} kept changing while it was fetched ({ATTEMPTS} listings): wait until the "
        "`posetune data push` (or other upload) to it has finished, or push new versions to a new path"
    )


def _version(files: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]}\n".encode())
    return digest.hexdigest()[:16]


def _fetch_version(uri: str, files: dict[str, str], folder: Path, copy: Path) -> None:
    """Build the copy in a scratch folder: unchanged files linked from the newest complete
    copy, the others downloaded at their listed versions; then rename it into place."""
    previous, manifest = _newest_copy(folder, exclude=copy)
    partial = folder / f".{copy.name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        missing = {}
        for name, version in files.items():
            source = previous / _local_name(uri, name) if previous else None
            if source is not None and manifest.get(name) == version and source.is_file():
                _link(source, partial / _local_name(uri, name))
            else:
                missing[name] = version
        log.info("fetching %s (%d of %d file(s); the others unchanged) into %s", uri, len(missing), len(files), copy)
        storage.backend(uri).download_files(uri, missing, partial)
        (partial / COMPLETE).write_text(json.dumps({"uri": uri, "files": files}))
        os.replace(partial, copy)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _local_name(uri: str, name: str) -> str:
    return name or storage.name_of(uri)


def _link(source: Path, target: Path) -> None:
    """A hard link (no second copy on disk; the files are never written in place), or a copy
    where the filesystem has none."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _newest_copy(folder: Path, exclude: Path) -> tuple[Path | None, dict[str, str]]:
    """The most recently completed copy in folder and its {name: version}."""
    copies = [p for p in folder.glob("*") if p != exclude and (p / COMPLETE).is_file()]
    if not copies:
        return None, {}
    newest = max(copies, key=lambda p: (p / COMPLETE).stat().st_mtime_ns)
    try:
        return newest, json.loads((newest / COMPLETE).read_text())["files"]
    except (ValueError, KeyError):  # a copy made by an older posetune: nothing to reuse
        return None, {}


def _hold(copy: Path) -> None:
    if copy not in _in_use:
        handle = open(copy / COMPLETE)  # noqa: SIM115 (held open until the process exits)
        fcntl.flock(handle, fcntl.LOCK_SH)
        _in_use[copy] = handle


def _remove_superseded(folder: Path, keep: Path) -> None:
    """Remove the other copies no process holds, and scratch folders of fetches that died (a
    live fetch holds the folder's lock, which the caller holds now)."""
    for path in folder.iterdir():
        if path == keep or not path.is_dir():
            continue
        if path.name.endswith(".partial"):
            shutil.rmtree(path, ignore_errors=True)
            continue
        marker = path / COMPLETE
        if not marker.is_file():
            continue  # not a copy this module made
        with open(marker) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.debug("keeping %s: a process on this node still reads it", path)
                continue
            log.info("removing %s, superseded by %s", path, keep.name)
            shutil.rmtree(path, ignore_errors=True)
