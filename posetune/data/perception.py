"""Reading Unity Perception pose datasets (legacy and SOLO) into a flat, validated index.

All label JSON is parsed once, up front (the reference re-parsed a captures file for every
sample). Values are read by key name, in both the object form ({"x": .., "y": ..}) and the
list form ([x, y, z]); captures without the labelled object are skipped and counted; every
defect is a ``DataError`` naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import zipfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from posetune import storage
from posetune.errors import DataError

log = logging.getLogger(__name__)

BOX3D_DEFINITION_ID = "0bfbe00d-00fa-4555-88d1-471b58449f5c"  # Perception's 3D box labeler
QUATERNION_NORM_TOLERANCE = 0.01  # labels are unit quaternions written as floats


# --- Where the files are: a folder or a zip ---------------------------------------------------


class FolderSource:
    """A dataset split stored as a folder."""

    def __init__(self, root: Path):
        self.root = root

    def files(self) -> list[str]:
        names = []
        for folder, _, filenames in os.walk(self.root):
            relative = Path(folder).relative_to(self.root)
            names += [(relative / name).as_posix() for name in filenames]
        return names

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def fingerprint(self, name: str) -> str:
        """Changes whenever the file does; keys the image cache."""
        stat = (self.root / name).stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"

    def read_many(self, names: Iterable[str]) -> Iterator[bytes]:
        return map(self.read, names)

    def describe(self, name: str = "") -> str:
        return str(self.root / name) if name else str(self.root)


class ZipSource:
    """A dataset split stored inside a .zip (under `prefix`). Each process opens its own handle,
    so DataLoader workers can read concurrently."""

    def __init__(self, path: Path, prefix: str):
        self.path, self.prefix = path, prefix
        self._handle: zipfile.ZipFile | None = None
        self._pid = -1
        with zipfile.ZipFile(path) as archive:
            self._infos = {
                info.filename[len(prefix) :]: info
                for info in archive.infolist()
                if info.filename.startswith(prefix) and not info.is_dir()
            }

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None, "_pid": -1}

    def files(self) -> list[str]:
        return list(self._infos)

    def read(self, name: str) -> bytes:
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = zipfile.ZipFile(self.path), os.getpid()
        return self._handle.read(self.prefix + name)

    def fingerprint(self, name: str) -> str:
        info = self._infos[name]
        return f"{info.file_size}:{info.CRC}"

    def read_many(self, names: Iterable[str]) -> Iterator[bytes]:
        return map(self.read, names)

    def describe(self, name: str = "") -> str:
        return f"{self.path}!/{self.prefix}{name}"


class RemoteSource:
    """A dataset split stored as a folder in a bucket, read where it is: the head counts a
    split's samples from its listing and label files without downloading its images (each
    training node keeps a local copy, ``posetune.data.fetch``)."""

    READERS = 16  # label files are small: many reads in flight, not one round trip each

    def __init__(self, uri: str, files: dict[str, str]):
        self.uri, self._files = uri, files

    def files(self) -> list[str]:
        return list(self._files)

    def read(self, name: str) -> bytes:
        return storage.read_bytes(storage.join(self.uri, name))

    def read_many(self, names: Iterable[str]) -> Iterator[bytes]:
        with ThreadPoolExecutor(self.READERS) as pool:
            yield from pool.map(self.read, names)

    def fingerprint(self, name: str) -> str:
        return self._files[name]

    def describe(self, name: str = "") -> str:
        return storage.join(self.uri, name) if name else self.uri


Source = FolderSource | ZipSource | RemoteSource


def open_split(root: str | Path, split: str) -> Source:
    """The split folder `split` of a dataset root (a folder, or a .zip holding the folders;
    a folder in a bucket is read where it is, a .zip in a bucket must be fetched first)."""
    if not storage.is_local(root):
        return _open_remote_split(str(root), split)
    root = Path(root)
    if root.suffix.lower() == ".zip":
        if not root.is_file():
            raise DataError(f"dataset zip {root} not found (dataset.root)")
        try:
            with zipfile.ZipFile(root) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            raise DataError(f"{root} is not a valid zip file (dataset.root)") from None
        # The split folder sits at the top of the zip or inside one top-level folder.
        tops = {name.split("/", 1)[0] for name in names if "/" in name}
        for prefix in [f"{split}/"] + [f"{top}/{split}/" for top in sorted(tops)]:
            if any(name.startswith(prefix) for name in names):
                return ZipSource(root, prefix)
        raise DataError(f"{root} has no '{split}/' split folder (dataset.root must hold train/, val/, test/)")
    folder = root / split
    if not folder.is_dir():
        if not root.exists():
            raise DataError(f"dataset.root {root} does not exist")
        raise DataError(
            f"split folder {folder} not found: dataset.root must hold "
            f"{split}/ (and the other split folders), e.g. from `posetune data synth`"
        )
    return FolderSource(folder)


def _open_remote_split(root: str, split: str) -> RemoteSource:
    if root.lower().endswith(".zip"):
        raise DataError(f"{root}: a .zip in a bucket is read from a local copy (posetune.data.fetch.fetch_dataset)")
    uri = storage.join(root, split)
    files = storage.list_files(uri)
    if not files or "" in files:
        if not storage.list_files(root):
            raise DataError(f"dataset.root {root} does not exist (no object or folder of that name)")
        raise DataError(f"split folder {uri} not found: dataset.root must hold {split}/ (and the other split folders)")
    return RemoteSource(uri, files)


# --- The index --------------------------------------------------------------------------------


@dataclass
class PoseIndex:
    """Every usable sample of one split: image paths inside `source` and their labels."""

    source: Source
    images: list[str]
    translations: np.ndarray  # (N, 3) float32, metres, Unity camera frame
    quaternions: np.ndarray  # (N, 4) float32, unit, (x, y, z, w)
    skipped: int  # captures without the labelled object
    format: str  # "legacy" or "solo"

    def __len__(self) -> int:
        return len(self.images)

    def head(self, n: int) -> PoseIndex:
        """The first n samples (n = 0: all), like the reference's sample_size."""
        if n <= 0 or n >= len(self):
            return self
        return PoseIndex(
            self.source,
            self.images[:n],
            self.translations[:n],
            self.quaternions[:n],
            self.skipped,
            self.format,
        )


def read_split(root: str | Path, split: str, label_name: str) -> PoseIndex:
    """Parse and validate a split's labels; raise DataError on any defect or if it is empty."""
    source = open_split(root, split)
    files = source.files()
    legacy = sorted((f for f in files if re.search(r"(^|/)captures_\d+\.json$", f)), key=_numbered)
    solo = sorted((f for f in files if f.endswith(".frame_data.json")), key=_numbered)
    if legacy:
        fmt, records, total = "legacy", *_read_legacy(source, legacy, label_name)
    elif solo:
        fmt, records, total = "solo", *_read_solo(source, solo, label_name)
    else:
        raise DataError(
            f"{source.describe()} holds no Unity Perception captures (expected "
            "Dataset*/captures_*.json for the legacy format or sequence.*/step*.frame_data.json for SOLO)"
        )
    skipped = total - len(records)
    if not records:
        raise DataError(
            f"{source.describe()}: no usable samples: {total} captures, none with a "
            f"'{label_name}' instance (estimator.label_name)"
        )
    _check_images_exist(source, set(files), [image for image, _, _ in records])
    if skipped:
        log.info(
            "%s: skipped %d of %d captures without a '%s' instance",
            source.describe(),
            skipped,
            total,
            label_name,
        )
    images, translations, quaternions = zip(*records, strict=True)
    return PoseIndex(
        source,
        list(images),
        np.asarray(translations, dtype=np.float32),
        np.asarray(quaternions, dtype=np.float32),
        skipped,
        fmt,
    )


def _numbered(name: str) -> tuple:
    """Natural sort: captures_2 before captures_10, sequence.2 before sequence.10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _load_all(source: Source, names: list[str]) -> Iterator[tuple[str, Any]]:
    """(name, parsed JSON) for each of names, in order."""
    for name, raw in zip(names, source.read_many(names), strict=True):
        yield name, _parse_json(source, name, raw)


def _parse_json(source: Source, name: str, raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{source.describe(name)}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except UnicodeDecodeError:
        raise DataError(f"{source.describe(name)}: not a UTF-8 JSON file") from None


def _field(obj: Any, keys: tuple[str, ...], where: str) -> Any:
    """obj[k] for the first k present (camelCase / snake_case spellings), else a DataError."""
    if isinstance(obj, dict):
        for key in keys:
            if key in obj:
                return obj[key]
    raise DataError(f"{where}: missing field '{keys[0]}'")


def _vector(value: dict, key: str, axes: str, where: str) -> list[float]:
    """A labelled vector in either form: {"x": .., "y": ..} (by key name) or [x, y, ..]."""
    raw = _field(value, (key,), where)
    if isinstance(raw, dict):
        items = [_field(raw, (axis,), f"{where}: {key}") for axis in axes]
    elif isinstance(raw, list) and len(raw) == len(axes):
        items = raw
    else:
        expected = f"an object with {', '.join(axes)} or a list of {len(axes)} numbers"
        raise DataError(f"{where}: '{key}' must be {expected}, got {raw!r}")
    try:
        numbers = [float(item) for item in items]
    except (TypeError, ValueError):
        raise DataError(f"{where}: '{key}' must hold numbers, got {raw!r}") from None
    if not all(math.isfinite(n) for n in numbers):
        raise DataError(f"{where}: non-finite value in '{key}': {raw!r}")
    return numbers


def _pose(value: dict, where: str) -> tuple[list[float], list[float]]:
    translation = _vector(value, "translation", "xyz", where)
    quaternion = _vector(value, "rotation", "xyzw", where)
    norm = math.sqrt(sum(c * c for c in quaternion))
    if abs(norm - 1) > QUATERNION_NORM_TOLERANCE:
        raise DataError(f"{where}: rotation quaternion has norm {norm:.4f}, expected 1 (a unit quaternion)")
    return translation, [c / norm for c in quaternion]


def _pick_instance(values: Any, label_name: str, where: str) -> dict | None:
    if not isinstance(values, list):
        raise DataError(f"{where}: 'values' must be a list, got {type(values).__name__}")
    for value in values:
        if _field(value, ("label_name", "labelName"), where) == label_name:
            return value
    return None


def _is_box3d(annotation: Any) -> bool:
    """The 3D box labeler's entry: by its well-known definition id, or (for datasets that
    registered the labeler under another id) by values that carry a rotation."""
    if not isinstance(annotation, dict):
        return False
    if annotation.get("annotation_definition") == BOX3D_DEFINITION_ID:
        return True
    values = annotation.get("values")
    return isinstance(values, list) and bool(values) and isinstance(values[0], dict) and "rotation" in values[0]


def _read_legacy(source: Source, names: list[str], label_name: str) -> tuple[list, int]:
    records, total = [], 0
    for name, document in _load_all(source, names):
        captures = _field(document, ("captures",), source.describe(name))
        for number, capture in enumerate(captures):
            total += 1
            where = f"{source.describe(name)}: capture #{number}"
            filename = _field(capture, ("filename",), where)
            annotations = _field(capture, ("annotations",), where)
            for box in filter(_is_box3d, annotations):
                value = _pick_instance(_field(box, ("values",), where), label_name, where)
                if value is not None:
                    records.append((filename, *_pose(value, where)))
                    break
    return records, total


def _read_solo(source: Source, names: list[str], label_name: str) -> tuple[list, int]:
    records, total = [], 0
    for name, frame in _load_all(source, names):
        folder = PurePosixPath(name).parent
        for number, capture in enumerate(_field(frame, ("captures",), source.describe(name))):
            if "RGBCamera" not in str(capture.get("@type", "")):
                continue
            total += 1
            where = f"{source.describe(name)}: capture #{number}"
            filename = (folder / _field(capture, ("filename",), where)).as_posix()
            for annotation in _field(capture, ("annotations",), where):
                if "BoundingBox3D" not in str(annotation.get("@type", "")):
                    continue
                value = _pick_instance(_field(annotation, ("values",), where), label_name, where)
                if value is not None:
                    records.append((filename, *_pose(value, where)))
                    break
    return records, total


def _check_images_exist(source: Source, files: set[str], images: list[str]) -> None:
    missing = [image for image in images if image not in files]
    if missing:
        shown = ", ".join(source.describe(m) for m in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(f"{len(missing)} labelled image(s) not found: {shown}{more}")
