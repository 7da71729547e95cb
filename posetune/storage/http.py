"""``http(s)://``, read only: downloads are streamed with a size cap and a timeout, and checked
against an expected SHA-256 when one is given (``model.pt#sha256=<hex>`` or the caller's
argument)."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request

from posetune.errors import StorageError
from posetune.storage.base import MiB, Storage, split_sha256


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
