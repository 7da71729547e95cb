"""What every scheme shares: the ``Storage`` base class, atomic local writes, node-wide file
locks, posetune's per-node cache folder and the ``#sha256=`` suffix of a URI (and the check of
an expected SHA-256)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from posetune.errors import StorageError

MiB = 1024 * 1024


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block succeeds,
    removed when it fails (rename is atomic within a filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per writer; created by the caller with plain open() and the usual umask
    # permissions, unlike mkstemp's 0600.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock shared by every process on the node (trials, workers)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cache_root() -> Path:
    """posetune's per-node cache (decoded images, fetched datasets): $XDG_CACHE_HOME/posetune."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "posetune"


def split_sha256(uri: str) -> tuple[str, str | None]:
    """'https://h/model.pt#sha256=ab12..' -> ('https://h/model.pt', 'ab12..')."""
    url, _, fragment = uri.partition("#")
    if fragment.startswith("sha256="):
        return url, fragment.removeprefix("sha256=")
    return uri, None


_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def check_sha256(value: str | None, where: str) -> str | None:
    """An expected SHA-256 in lowercase (None when there is none). A value that cannot be one
    is the user's mistake, refused before anything is downloaded: comparing a whole download
    with 'xyz' could only end in a mismatch."""
    if not value:
        return None
    if not _SHA256.fullmatch(value):
        raise StorageError(
            f"{where}: the expected SHA-256 (--sha256 or #sha256=) must be 64 hexadecimal digits, "
            f"as `sha256sum FILE` prints them; got {value!r}"
        )
    return value.lower()


def expected_sha256(uri: str, sha256: str | None = None) -> str | None:
    """The SHA-256 a download of uri must have: the argument, else the URI's #sha256=."""
    url, fragment = split_sha256(uri)
    return check_sha256(sha256 or fragment, url)


def verify_sha256(path: Path, expected: str | None, where: str) -> None:
    """Hash a local file in chunks (never whole in memory) and compare it with `expected`."""
    if not expected:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(MiB):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise StorageError(f"{where}: SHA-256 {digest.hexdigest()} does not match the expected {expected}")


def _name_of(uri: str) -> str:
    return split_sha256(uri)[0].rstrip("/").rsplit("/", 1)[-1]


class Storage:
    """One URI scheme. Paths passed in are whole URIs (or local paths for LocalStorage)."""

    read_only = False

    def read_bytes(self, uri: str) -> bytes:
        raise NotImplementedError

    def write_bytes(self, uri: str, data: bytes) -> None:
        raise NotImplementedError

    def exists(self, uri: str) -> bool:
        """A file, or a folder (prefix) holding at least one file."""
        raise NotImplementedError

    def list_files(self, uri: str) -> dict[str, str]:
        """{name relative to uri: version} of every file under uri (a folder), or {"": version}
        when uri is one file. The version changes whenever the file's content may have."""
        raise NotImplementedError

    def download(self, uri: str, local: Path, version: str | None = None) -> None:
        """Copy one file to a local path, verified, appearing complete or not at all. `version`
        (from list_files) pins the download to that version where the scheme can."""
        with atomic_path(local) as tmp:
            tmp.write_bytes(self.read_bytes(uri))

    def download_files(self, uri: str, files: dict[str, str], local: Path) -> None:
        """Download some of list_files(uri)'s {name: version} into the local folder (the file
        itself for the name ""), each pinned to its listed version where the scheme can. A
        scheme with a parallel transfer overrides this."""
        for name, version in files.items():
            self.download(f"{uri.rstrip('/')}/{name}" if name else uri, local / (name or _name_of(uri)), version)

    def upload(self, local: Path, uri: str) -> None:
        self.write_bytes(uri, local.read_bytes())

    def copy(self, source: str, destination: str) -> None:
        self.write_bytes(destination, self.read_bytes(source))

    def remove_tree(self, uri: str) -> None:
        raise NotImplementedError

    def ray_storage(self, uri: str) -> tuple[str, Any]:
        """(storage_path, pyarrow filesystem or None) for Ray Tune/Train's RunConfig."""
        raise StorageError(f"{uri}: Ray cannot keep experiments on {self.describe()}")

    def from_ray_path(self, path: str) -> str:
        """A path Ray reports (e.g. a checkpoint folder) back as a URI of this scheme."""
        return path

    def describe(self) -> str:
        return type(self).__name__
