"""Every path a user gives, in one place: local files and folders, ``gs://bucket/key``, and
(read only) ``http(s)://``.

Each scheme is one ``Storage`` class (``local``, ``gcs``, ``http``; the base class, atomic
writes and file locks in ``base``) registered in ``SCHEMES``; everything else in posetune calls
the functions in this module with the user's string and never builds a ``Path`` from it.
Adding ``s3://`` means one module beside these and one line in ``SCHEMES``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from posetune.errors import StorageError
from posetune.storage.base import (
    MiB,
    Storage,
    atomic_path,
    cache_root,
    check_sha256,
    expected_sha256,
    file_lock,
    split_sha256,
    verify_sha256,
)
from posetune.storage.gcs import GCSStorage
from posetune.storage.http import HTTPStorage
from posetune.storage.local import LocalStorage

__all__ = [
    "SCHEMES",
    "GCSStorage",
    "HTTPStorage",
    "LocalStorage",
    "MiB",
    "Storage",
    "absolute",
    "atomic_path",
    "backend",
    "cache_root",
    "check_sha256",
    "copy",
    "download_tree",
    "exists",
    "file_lock",
    "from_ray_path",
    "is_local",
    "join",
    "list_files",
    "list_storage_schemes",
    "local_copy",
    "local_path",
    "name_of",
    "ray_storage",
    "read_bytes",
    "read_text",
    "remove_tree",
    "scheme_of",
    "split_sha256",
    "upload_tree",
    "write_bytes",
    "write_text",
]


# --- The registry and the functions the rest of posetune calls --------------------------------

SCHEMES: dict[str, Callable[[], Storage]] = {
    "": LocalStorage,
    "file": LocalStorage,
    "gs": GCSStorage,
    "http": HTTPStorage,
    "https": HTTPStorage,
}
_instances: dict[str, Storage] = {}


def list_storage_schemes() -> list[str]:
    """The URI schemes a path may use (a path without one is local)."""
    return sorted(scheme for scheme in SCHEMES if scheme)


def scheme_of(uri: str | Path) -> str:
    head, sep, _ = str(uri).partition("://")
    return head.lower() if sep else ""


def backend(uri: str | Path) -> Storage:
    scheme = scheme_of(uri)
    if scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in sorted(SCHEMES) if s)
        raise StorageError(f"{uri}: unsupported scheme {scheme}:// (supported: local paths, {known})")
    if scheme not in _instances:
        _instances[scheme] = SCHEMES[scheme]()
    return _instances[scheme]


def is_local(uri: str | Path) -> bool:
    return isinstance(backend(uri), LocalStorage)


def absolute(uri: str | Path) -> str:
    """Local paths made absolute (trials run in other processes, folders and nodes); URIs as is."""
    return str(LocalStorage.path(str(uri)).resolve()) if is_local(uri) else str(uri)


def local_path(uri: str | Path, what: str) -> Path:
    """A path that must be on this machine (a run folder, a cache): a clear error otherwise."""
    if not is_local(uri):
        raise StorageError(f"{what} must be a local folder or file, got {uri}")
    return LocalStorage.path(str(uri))


def join(uri: str | Path, *parts: str) -> str:
    uri = str(uri)
    if is_local(uri):
        return str(LocalStorage.path(uri).joinpath(*parts))
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def name_of(uri: str | Path) -> str:
    return split_sha256(str(uri))[0].rstrip("/").rsplit("/", 1)[-1]


def read_bytes(uri: str | Path, sha256: str | None = None) -> bytes:
    """The whole content (small files: images, configs); checkpoints go through local_copy."""
    store = backend(uri)
    if isinstance(store, HTTPStorage):
        return store.read_bytes(str(uri), sha256)
    expected = check_sha256(sha256, str(uri))  # a malformed one is refused before reading
    data = store.read_bytes(str(uri))
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise StorageError(f"{uri}: SHA-256 {hashlib.sha256(data).hexdigest()} does not match the expected {expected}")
    return data


def read_text(uri: str | Path) -> str:
    return read_bytes(uri).decode()


def write_bytes(uri: str | Path, data: bytes) -> None:
    backend(uri).write_bytes(str(uri), data)


def write_text(uri: str | Path, text: str) -> None:
    write_bytes(uri, text.encode())


def exists(uri: str | Path) -> bool:
    return backend(uri).exists(str(uri))


def list_files(uri: str | Path) -> dict[str, str]:
    return backend(uri).list_files(str(uri))


def copy(source: str | Path, destination: str | Path) -> None:
    """Copy one file between any two locations (within a bucket, without passing through here)."""
    source, destination = str(source), str(destination)
    store = backend(source)
    if type(store) is type(backend(destination)):  # within one scheme (a bucket copies server-side)
        store.copy(source, destination)
    elif is_local(destination):
        store.download(source, LocalStorage.path(destination))
    elif is_local(source):
        backend(destination).upload(LocalStorage.path(source), destination)
    else:
        write_bytes(destination, read_bytes(source))


def remove_tree(uri: str | Path) -> None:
    backend(uri).remove_tree(str(uri))


def ray_storage(uri: str | Path) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for a Ray Tune/Train RunConfig at this location."""
    return backend(uri).ray_storage(str(uri))


def from_ray_path(like: str | Path, path: str) -> str:
    """A path Ray reported for storage at `like` (e.g. a checkpoint), as a URI."""
    return backend(like).from_ray_path(path)


@contextmanager
def local_copy(uri: str | Path, sha256: str | None = None) -> Iterator[Path]:
    """A local file with the content at uri, for APIs that take only local paths (MLflow's
    log_artifact, torch.load of a large checkpoint): the file itself when it is local, else a
    temporary download streamed to disk, removed after the block. With `sha256` (or an
    https:// URI's #sha256=) the file is checked first."""
    uri = str(uri)
    store = backend(uri)
    expected = expected_sha256(uri, sha256) if isinstance(store, HTTPStorage) else check_sha256(sha256, uri)
    if isinstance(store, LocalStorage):
        path = store.read_path(uri)  # a StorageError when it is missing
        verify_sha256(path, expected, uri)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="posetune-") as folder:
        local = Path(folder, name_of(uri))
        if isinstance(store, HTTPStorage):
            store.download(uri, local, sha256=expected)  # hashed while it streams
        else:
            store.download(uri, local)
            verify_sha256(local, expected, uri)
        yield local


def upload_tree(local: Path, uri: str, progress: Callable[[int], None] | None = None) -> int:
    """Upload every file under a local folder to uri/<relative name>; returns bytes sent."""
    sent = 0
    for folder, _, names in os.walk(local):
        for name in sorted(names):
            path = Path(folder, name)
            backend(uri).upload(path, join(uri, path.relative_to(local).as_posix()))
            sent += path.stat().st_size
            if progress:
                progress(path.stat().st_size)
    return sent


def download_tree(uri: str | Path, local: Path) -> None:
    """Copy every file under uri into the local folder (each verified and atomic)."""
    store = backend(uri)
    for name in store.list_files(str(uri)):
        store.download(join(uri, name) if name else str(uri), local / (name or name_of(uri)))
