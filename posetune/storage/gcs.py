"""``gs://`` through google-cloud-storage (and, where Ray needs a ``pyarrow.fs`` filesystem,
pyarrow's ``GcsFileSystem``). Credentials come only from the environment (Application Default
Credentials); with ``STORAGE_EMULATOR_HOST`` set both talk to that emulator anonymously. Calls
retry on transient errors (the library's ``DEFAULT_RETRY``), uploads over 8 MiB are resumable,
downloads are checked against the object's CRC32C."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posetune.errors import StorageError
from posetune.storage.base import MiB, Storage, atomic_path


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
