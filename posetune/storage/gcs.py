"""``gs://`` through google-cloud-storage (and, where Ray needs a ``pyarrow.fs`` filesystem,
pyarrow's ``GcsFileSystem``). Credentials come only from the environment (Application Default
Credentials); with ``STORAGE_EMULATOR_HOST`` set both talk to that emulator anonymously. Calls
retry on transient errors (the library's ``DEFAULT_RETRY``, also for the server-side copy, which
the library retries by default only with a destination precondition), uploads over 8 MiB are
resumable, downloads are checked against the object's CRC32C (a mismatch is a StorageError), and
many files download in parallel (the library's ``transfer_manager``), each pinned to the
generation it was listed with."""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posetune.errors import StorageChanged, StorageError
from posetune.storage.base import MiB, Storage, atomic_path

# Google's bucket naming rules: lowercase letters, digits, '-', '_' and '.', starting and ending
# with a letter or digit; 3-63 characters (up to 222 with dots, each dotted part at most 63).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
BUCKET_RULE = "3-63 lowercase letters, digits, '-', '_' or '.', starting and ending with a letter or digit"


class GCSStorage(Storage):
    """Google Cloud Storage through google-cloud-storage. One client per process, made on first
    use (Ray pickles objects that hold a Storage; clients do not travel)."""

    RESUMABLE_CHUNK = 8 * MiB  # uploads above this size are resumable, in chunks of this size
    SLICE = 32 * MiB  # a one-object download (a zipped dataset) goes in parallel slices of this size
    TRANSFER_WORKERS = 8  # parallel downloads: the library's default, within requests' pool of 10

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
        """(bucket, key); a name GCS would refuse is the user's error here, before any client
        (the library checks only the first and last character, with a ValueError)."""
        bucket, _, key = uri.removeprefix("gs://").partition("/")
        if not bucket:
            raise StorageError(f"{uri}: a gs:// URI needs a bucket (gs://BUCKET/PATH)")
        if not _BUCKET.fullmatch(bucket) or any(len(part) > 63 for part in bucket.split(".")):
            raise StorageError(f"{uri}: {bucket!r} is not a bucket name ({BUCKET_RULE})")
        return bucket, key

    def _call(self, uri: str, what: str, call: Callable[[], Any], pinned: bool = False) -> Any:
        """Run one client call; turn the library's errors into one-line StorageErrors."""
        try:
            return call()
        except Exception as exc:
            raise self._error(exc, uri, what, pinned) from None

    @staticmethod
    def _error(exc: Exception, uri: str, what: str, pinned: bool = False) -> Exception:
        """The StorageError for one of the library's errors (anything else is a bug: as is).
        `pinned`: the call asked for a listed generation, so NotFound means it changed."""
        from google.api_core import exceptions
        from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

        if isinstance(exc, exceptions.NotFound) and pinned:
            return StorageChanged(f"{uri} was rewritten or deleted after it was listed (the listed generation is gone)")
        if isinstance(exc, exceptions.NotFound):
            return StorageError(f"{uri}: no such object")
        if isinstance(exc, exceptions.Forbidden):
            return StorageError(f"{what} {uri} was refused ({exc.message}): check the credentials' access")
        if isinstance(exc, DataCorruption):  # not an API error: the bytes differ from the object's CRC32C
            return StorageError(f"{what} {uri}: the data arrived corrupted (CRC32C mismatch); nothing was kept")
        if isinstance(exc, (exceptions.GoogleAPIError, InvalidResponse)):
            return StorageError(f"{what} {uri} failed: {str(exc).splitlines()[0]}")
        if isinstance(exc, OSError):  # connection refused / reset after the retries ran out
            return StorageError(f"{what} {uri} failed: {exc}")
        return exc

    def _blob(self, uri: str, version: str | None = None):
        bucket, key = self.split(uri)
        return self.client.bucket(bucket).blob(key, generation=int(version) if version else None)

    def read_bytes(self, uri: str) -> bytes:
        from google.cloud.storage.retry import DEFAULT_RETRY

        blob = self._blob(uri)
        return self._call(uri, "reading", lambda: blob.download_as_bytes(checksum="crc32c", retry=DEFAULT_RETRY))

    def download(self, uri: str, local: Path, version: str | None = None) -> None:
        from google.cloud.storage.retry import DEFAULT_RETRY

        blob = self._blob(uri, version)  # with a version, that generation or an error
        with atomic_path(local) as tmp:
            self._call(
                uri,
                "downloading",
                lambda: blob.download_to_filename(tmp, checksum="crc32c", retry=DEFAULT_RETRY),
                pinned=version is not None,
            )

    def download_files(self, uri: str, files: dict[str, str], local: Path) -> None:
        """Many objects at once through the library's transfer_manager (threads: the objects
        of a Perception dataset are small, and a Ray worker should not fork), each pinned to
        its listed generation and CRC32C-checked; one object (a .zip) in parallel slices,
        checked against the CRC32C of that generation. Files may be left partly written on an
        error: callers download into a scratch folder."""
        from google.cloud.storage import transfer_manager

        bucket_name, key = self.split(uri)
        bucket, prefix = self.client.bucket(bucket_name), key.rstrip("/")
        if "" in files:  # one object
            blob = bucket.blob(prefix, generation=int(files[""]))
            target = local / prefix.rsplit("/", 1)[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            self._call(
                uri,
                "downloading",
                lambda: transfer_manager.download_chunks_concurrently(
                    blob,
                    str(target),
                    chunk_size=self.SLICE,
                    worker_type=transfer_manager.THREAD,
                    max_workers=self.TRANSFER_WORKERS,
                    crc32c_checksum=True,
                ),
                pinned=True,
            )
            return
        pairs = []
        for name, generation in sorted(files.items()):
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            pairs.append(
                (bucket.blob(f"{prefix}/{name}" if prefix else name, generation=int(generation)), local / name)
            )
        results = self._call(
            uri,
            "downloading",
            lambda: transfer_manager.download_many(
                [(blob, str(path)) for blob, path in pairs],
                download_kwargs={"checksum": "crc32c"},
                worker_type=transfer_manager.THREAD,
                max_workers=self.TRANSFER_WORKERS,
            ),
        )
        for (blob, _), result in zip(pairs, results, strict=True):
            if isinstance(result, Exception):  # the first failure, as the error of its object
                raise self._error(result, f"gs://{bucket_name}/{blob.name}", "downloading", pinned=True) from None

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
        """A server-side copy, retried on transient errors. The library retries a copy only
        with a destination precondition (``ifGenerationMatch``); here the precondition is on
        the source's generation instead, which makes a retry safe: a repeated copy writes the
        same bytes again, or fails (412) if the source changed in between."""
        from google.cloud.storage.retry import DEFAULT_RETRY

        (src_bucket, src_key), (dst_bucket, dst_key) = self.split(source), self.split(destination)
        bucket = self.client.bucket(src_bucket)
        blob = self._call(source, "copying", lambda: bucket.get_blob(src_key, retry=DEFAULT_RETRY))
        if blob is None:
            raise StorageError(f"{source}: no such object")
        self._call(
            source,
            "copying",
            lambda: bucket.copy_blob(
                blob,
                self.client.bucket(dst_bucket),
                dst_key,
                if_source_generation_match=blob.generation,
                retry=DEFAULT_RETRY,
            ),
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
