"""Local files and folders: writes are atomic (a temporary file renamed into place), so readers
see the old file or the new one, never a torn one, even if the writer is killed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from posetune.errors import StorageError
from posetune.storage.base import Storage, atomic_path


class LocalStorage(Storage):
    """Local files and folders (also any shared filesystem mounted on every node)."""

    @staticmethod
    def path(uri: str) -> Path:
        return Path(uri.removeprefix("file://")).expanduser()

    def read_bytes(self, uri: str) -> bytes:
        return self.read_path(uri).read_bytes()

    def write_bytes(self, uri: str, data: bytes) -> None:
        with atomic_path(self.path(uri)) as tmp, open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    def exists(self, uri: str) -> bool:
        return self.path(uri).exists()

    def list_files(self, uri: str) -> dict[str, str]:
        root = self.path(uri)
        if root.is_file():
            return {"": _stat_version(root)}
        files = {}
        for folder, _, names in os.walk(root):
            for name in names:
                path = Path(folder, name)
                files[path.relative_to(root).as_posix()] = _stat_version(path)
        return files

    def download(self, uri: str, local: Path, version: str | None = None) -> None:
        with atomic_path(local) as tmp:
            shutil.copyfile(self.read_path(uri), tmp)

    def read_path(self, uri: str) -> Path:
        path = self.path(uri)
        if not path.is_file():
            raise StorageError(f"{path} not found")
        return path

    def upload(self, local: Path, uri: str) -> None:
        with atomic_path(self.path(uri)) as tmp:
            shutil.copyfile(local, tmp)

    def copy(self, source: str, destination: str) -> None:
        self.upload(self.read_path(source), destination)

    def remove_tree(self, uri: str) -> None:
        shutil.rmtree(self.path(uri), ignore_errors=True)

    def ray_storage(self, uri: str) -> tuple[str, Any]:
        return str(self.path(uri).resolve()), None

    def describe(self) -> str:
        return "the local filesystem"


def _stat_version(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"
