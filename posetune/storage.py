"""One interface for reading and atomically writing files by path or URI.

Local paths are handled here; other schemes (gs://, http(s)://) register a reader in
``READERS`` so that checkpoints, configs and datasets load the same way wherever they live.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from posetune.errors import PosetuneError


def _read_local(uri: str) -> bytes:
    path = Path(uri.removeprefix("file://"))
    if not path.is_file():
        raise PosetuneError(f"{path} not found")
    return path.read_bytes()


# scheme -> reader; "" is a plain path
READERS: dict[str, Callable[[str], bytes]] = {"": _read_local, "file": _read_local}


def scheme_of(uri: str) -> str:
    head, sep, _ = str(uri).partition("://")
    return head.lower() if sep else ""


def read_bytes(uri: str | Path) -> bytes:
    """The whole file at a local path or a registered URI scheme."""
    uri = str(uri)
    scheme = scheme_of(uri)
    if scheme not in READERS:
        known = ", ".join(f"{s}://" for s in sorted(READERS) if s) or "none"
        raise PosetuneError(f"cannot read {uri}: unsupported scheme {scheme}:// (supported: local paths, {known})")
    return READERS[scheme](uri)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block succeeds,
    removed when it fails. Readers see the old file or the new one, never a torn one, even if
    the process is killed mid-write (rename is atomic within a filesystem)."""
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


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def copy_atomic(source: str | Path, destination: str | Path) -> None:
    """Copy a (possibly large) file so that the destination appears complete or not at all."""
    with atomic_path(destination) as tmp:
        shutil.copyfile(source, tmp)
