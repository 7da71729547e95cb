"""Every path a user gives, in one place: local files and folders, ``gs://bucket/key``, and
(read only) ``http(s)://``.

Each scheme is one ``Storage`` class registered in ``SCHEMES``; everything else in posetune
calls the functions at the bottom of this module with the user's string and never builds a
``Path`` from it. Adding ``s3://`` means one class here and one line in ``SCHEMES``.

- Local writes are atomic (a temporary file renamed into place), so readers see the old file
  or the new one, never a torn one, even if the writer is killed.
- ``gs://`` goes through google-cloud-storage (and, where Ray needs a ``pyarrow.fs``
  filesystem, pyarrow's ``GcsFileSystem``). Credentials come only from the environment
  (Application Default Credentials); with ``STORAGE_EMULATOR_HOST`` set both talk to that
  emulator anonymously. Calls retry on transient errors (the library's ``DEFAULT_RETRY``),
  uploads over 8 MiB are resumable, downloads are checked against the object's CRC32C.
- ``http(s)://`` downloads are streamed with a size cap and a timeout, and checked against an
  expected SHA-256 when one is given (``model.pt#sha256=<hex>`` or the caller's argument).
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from posetune.errors import DataError, StorageError

log = logging.getLogger(__name__)

MiB = 1024 * 1024


# --- Local files ------------------------------------------------------------------------------


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

    def download(self, uri: str, local: Path) -> None:
        """Copy one file to a local path, verified, appearing complete or not at all."""
        with atomic_path(local) as tmp:
            tmp.write_bytes(self.read_bytes(uri))

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


class LocalStorage(Storage):
    """Local files and folders (also any shared filesystem mounted on every node)."""

    @staticmethod
    def path(uri: str) -> Path:
        return Path(uri.removeprefix("file://")).expanduser()

    def read_bytes(self, uri: str) -> bytes:
        path = self.path(uri)
        if not path.is_file():
            raise StorageError(f"{path} not found")
        return path.read_bytes()

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

    def download(self, uri: str, local: Path) -> None:
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


# --- gs:// ------------------------------------------------------------------------------------


class GCSStorage(Storage):
    """Google Cloud Storage through google-cloud-storage. One client per process, made on first
    use (Ray pickles objects that hold a Storage; clients do not travel)."""

    RESUMABLE_CHUNK = 8 * MiB  # uploads above this size are resumable, in chunks of this size

    def __init__(self) -> None:
        self._client = None

    def __getstate__(self) -> dict[str, Any]:
        return {"_client": None}

    @property
    def client(self):
        if self._client is None:
            from google.cloud import storage

            emulator = os.environ.get("STORAGE_EMULATOR_HOST")
            if emulator:
                from google.auth.credentials import AnonymousCredentials

                self._client = storage.Client(credentials=AnonymousCredentials(), project="posetune-emulator")
            else:
                try:
                    self._client = storage.Client()  # Application Default Credentials
                except Exception as exc:  # google.auth raises DefaultCredentialsError and friends
                    raise StorageError(
                        "no Google Cloud credentials for gs:// paths: run `gcloud auth application-default login` "
                        f"or use a service account on the VM ({type(exc).__name__})"
                    ) from None
        return self._client

    @staticmethod
    def split(uri: str) -> tuple[str, str]:
        bucket, _, key = uri.removeprefix("gs://").partition("/")
        if not bucket:
            raise StorageError(f"{uri}: a gs:// URI needs a bucket (gs://BUCKET/PATH)")
        return bucket, key

    def _call(self, uri: str, what: str, call: Callable[[], Any]) -> Any:
        """Run one client call; turn the library's errors into one-line StorageErrors."""
        from google.api_core import exceptions

        try:
            return call()
        except exceptions.NotFound:
            raise StorageError(f"{uri}: no such object") from None
        except exceptions.Forbidden as exc:
            raise StorageError(f"{what} {uri} was refused ({exc.message}): check the credentials' access") from None
        except exceptions.GoogleAPIError as exc:
            raise StorageError(f"{what} {uri} failed: {str(exc).splitlines()[0]}") from None
        except OSError as exc:  # connection refused / reset after the retries ran out
            raise StorageError(f"{what} {uri} failed: {exc}") from None

    def _blob(self, uri: str):
        bucket, key = self.split(uri)
        return self.client.bucket(bucket).blob(key)

    def read_bytes(self, uri: str) -> bytes:
        from google.cloud.storage.retry import DEFAULT_RETRY

        blob = self._blob(uri)
        return self._call(uri, "reading", lambda: blob.download_as_bytes(checksum="crc32c", retry=DEFAULT_RETRY))

    def download(self, uri: str, local: Path) -> None:
        from google.cloud.storage.retry import DEFAULT_RETRY

        blob = self._blob(uri)
        with atomic_path(local) as tmp:
            self._call(
                uri, "downloading", lambda: blob.download_to_filename(tmp, checksum="crc32c", retry=DEFAULT_RETRY)
            )

    def write_bytes(self, uri: str, data: bytes) -> None:
        from google.cloud.storage.retry import DEFAULT_RETRY

        blob = self._blob(uri)
        if len(data) > self.RESUMABLE_CHUNK:
            blob.chunk_size = self.RESUMABLE_CHUNK
        # An object appears whole or not at all; retrying an unconditional upload is safe
        # here because every writer of a key writes the same kind of content.
        self._call(uri, "writing", lambda: blob.upload_from_string(data, retry=DEFAULT_RETRY))

    def upload(self, local: Path, uri: str) -> None:
        from google.cloud.storage.retry import DEFAULT_RETRY

        blob = self._blob(uri)
        if local.stat().st_size > self.RESUMABLE_CHUNK:
            blob.chunk_size = self.RESUMABLE_CHUNK
        self._call(uri, "uploading to", lambda: blob.upload_from_filename(str(local), retry=DEFAULT_RETRY))

    def copy(self, source: str, destination: str) -> None:
        (src_bucket, src_key), (dst_bucket, dst_key) = self.split(source), self.split(destination)
        bucket = self.client.bucket(src_bucket)
        self._call(
            source,
            "copying",
            lambda: bucket.copy_blob(bucket.blob(src_key), self.client.bucket(dst_bucket), dst_key),
        )

    def exists(self, uri: str) -> bool:
        """One object, or a folder with at least one: two small requests, never a full listing."""
        bucket, key = self.split(uri)
        key = key.rstrip("/")
        if key and self._call(uri, "checking", lambda: self.client.bucket(bucket).get_blob(key)) is not None:
            return True
        folder = f"{key}/" if key else ""
        # A few names suffice: folder markers ("a/", "a/b/", written by pyarrow) sort first.
        page = self._call(uri, "listing", lambda: list(self.client.list_blobs(bucket, prefix=folder, max_results=10)))
        return any(not blob.name.endswith("/") for blob in page)

    def list_files(self, uri: str) -> dict[str, str]:
        bucket, key = self.split(uri)
        prefix = key.rstrip("/")
        blobs = self._call(uri, "listing", lambda: list(self.client.list_blobs(bucket, prefix=prefix)))
        files = {}
        for blob in blobs:
            if blob.name == prefix:
                return {"": str(blob.generation)}  # one object
            if blob.name.startswith(prefix + "/" if prefix else "") and not blob.name.endswith("/"):
                files[blob.name[len(prefix) :].lstrip("/")] = str(blob.generation)
        return files

    def remove_tree(self, uri: str) -> None:
        bucket, key = self.split(uri)
        prefix = key.rstrip("/") + "/"
        for blob in self._call(uri, "listing", lambda: list(self.client.list_blobs(bucket, prefix=prefix))):
            self._call(uri, "deleting", blob.delete)

    RAY_RETRY_LIMIT = datetime.timedelta(minutes=5)  # pyarrow's default (15 min) hides a dead end

    def ray_storage(self, uri: str) -> tuple[str, Any]:
        import pyarrow.fs

        bucket, key = self.split(uri)
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator:
            scheme, _, host = emulator.partition("://")
            filesystem = pyarrow.fs.GcsFileSystem(
                anonymous=True, endpoint_override=host or scheme, scheme=scheme, retry_time_limit=self.RAY_RETRY_LIMIT
            )
        else:  # Application Default Credentials
            filesystem = pyarrow.fs.GcsFileSystem(retry_time_limit=self.RAY_RETRY_LIMIT)
        return f"{bucket}/{key}".rstrip("/"), filesystem

    def from_ray_path(self, path: str) -> str:
        return path if path.startswith("gs://") else f"gs://{path.lstrip('/')}"

    def describe(self) -> str:
        return "Google Cloud Storage"


# --- http(s):// (read only) -------------------------------------------------------------------


class HTTPStorage(Storage):
    """Files served over HTTP(S), read only: streamed with a size cap and a read timeout, and
    checked against ``#sha256=<hex>`` when the URI carries one."""

    read_only = True

    def __init__(self, max_bytes: int = 8 * 1024 * MiB, timeout_s: float = 60.0):
        self.max_bytes, self.timeout_s = max_bytes, timeout_s

    def read_bytes(self, uri: str, sha256: str | None = None) -> bytes:
        url, expected = split_sha256(uri)
        expected = (sha256 or expected or "").lower() or None
        digest = hashlib.sha256()
        chunks, size = [], 0
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                length = response.headers.get("Content-Length")
                if length and int(length) > self.max_bytes:
                    raise StorageError(self._oversize(url, int(length)))
                while chunk := response.read(MiB):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise StorageError(self._oversize(url, size))
                    digest.update(chunk)
                    chunks.append(chunk)
        except urllib.error.HTTPError as exc:
            raise StorageError(f"{url}: the server answered {exc.code} {exc.reason}") from None
        except TimeoutError:
            raise StorageError(f"{url}: no data for {self.timeout_s:g} s (timed out)") from None
        except urllib.error.URLError as exc:
            raise StorageError(f"{url} cannot be reached: {exc.reason}") from None
        if expected and digest.hexdigest() != expected:
            raise StorageError(f"{url}: SHA-256 {digest.hexdigest()} does not match the expected {expected}")
        return b"".join(chunks)

    def _oversize(self, url: str, size: int) -> str:
        return f"{url} is larger than the {self.max_bytes / MiB:g} MiB download limit ({size / MiB:.1f} MiB or more)"

    def write_bytes(self, uri: str, data: bytes) -> None:
        raise StorageError(f"{uri}: http(s):// locations are read only; write to a local path or gs://")

    upload = copy = remove_tree = write_bytes  # type: ignore[assignment]

    def exists(self, uri: str) -> bool:
        return True  # known only by downloading; a missing file is an error when read

    def list_files(self, uri: str) -> dict[str, str]:
        return {"": split_sha256(uri)[0]}

    def describe(self) -> str:
        return "HTTP(S)"


def split_sha256(uri: str) -> tuple[str, str | None]:
    """'https://h/model.pt#sha256=ab12..' -> ('https://h/model.pt', 'ab12..')."""
    url, _, fragment = uri.partition("#")
    if fragment.startswith("sha256="):
        return url, fragment.removeprefix("sha256=")
    return uri, None


# --- The registry and the functions the rest of posetune calls --------------------------------

SCHEMES: dict[str, Callable[[], Storage]] = {
    "": LocalStorage,
    "file": LocalStorage,
    "gs": GCSStorage,
    "http": HTTPStorage,
    "https": HTTPStorage,
}
_instances: dict[str, Storage] = {}


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
    store = backend(uri)
    if isinstance(store, HTTPStorage):
        return store.read_bytes(str(uri), sha256)
    data = store.read_bytes(str(uri))
    if sha256 and hashlib.sha256(data).hexdigest() != sha256.lower():
        raise StorageError(f"{uri}: SHA-256 {hashlib.sha256(data).hexdigest()} does not match the expected {sha256}")
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
def local_copy(uri: str | Path) -> Iterator[Path]:
    """A local file with the content at uri, for APIs that take only local paths (MLflow's
    log_artifact): the file itself when it is local, else a temporary download."""
    if is_local(uri):
        yield LocalStorage().read_path(str(uri))  # a StorageError when it is missing
        return
    with tempfile.TemporaryDirectory(prefix="posetune-") as folder:
        local = Path(folder, name_of(uri))
        backend(uri).download(str(uri), local)
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


# --- Datasets: one local copy per node --------------------------------------------------------


def fetch_dataset(uri: str, cache_dir: str | Path | None = None) -> Path:
    """A local path holding the dataset at uri (a folder of split folders, or a .zip).

    Local paths are returned as they are. Remote ones are downloaded once per node into
    ``<cache>/datasets/``, keyed by every object's generation: a changed object is fetched
    again, an unchanged one never is. A file lock makes concurrent trials on a node wait for
    one download, and the copy appears (renamed into place) only when it is complete.
    """
    if is_local(uri):
        return LocalStorage.path(uri)
    files = list_files(uri)
    if not files:
        raise DataError(f"dataset.root {uri} does not exist (no object or folder of that name)")
    root = Path(cache_dir) if cache_dir else cache_root()
    digest = hashlib.sha256(uri.encode())
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]}\n".encode())
    target = root / "datasets" / f"{name_of(uri)}-{digest.hexdigest()[:16]}"
    complete = target / ".complete"
    if not complete.exists():
        with file_lock(target.with_name(target.name + ".lock")):
            if not complete.exists():  # another process may have fetched it while we waited
                _download_all(uri, files, target)
    return target / name_of(uri) if "" in files else target


def _download_all(uri: str, files: dict[str, str], target: Path) -> None:
    log.info("fetching %s (%d file(s)) into %s", uri, len(files), target)
    store = backend(uri)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        for name in files:
            destination = partial / (name or name_of(uri))
            store.download(join(uri, name) if name else uri, destination)
        (partial / ".complete").write_text(uri + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
