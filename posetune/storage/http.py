"""``http(s)://``, read only: downloads stream to a temporary file on disk while they are hashed
(never held whole in memory), with a size cap and a read timeout, and are checked against an
expected SHA-256 when one is given (``model.pt#sha256=<hex>`` or the caller's argument). Every
way a transfer can break (an HTTP error, a timeout, a server that closes early or resets the
connection, a TLS error) is one ``StorageError``, and the partial file is removed."""

from __future__ import annotations

import hashlib
import http.client
import ssl
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from posetune.errors import StorageError
from posetune.storage.base import MiB, Storage, atomic_path, expected_sha256, split_sha256


class HTTPStorage(Storage):
    """Files served over HTTP(S), read only: streamed to disk with a size cap and a read
    timeout, and checked against ``#sha256=<hex>`` when the URI carries one."""

    read_only = True

    def __init__(self, max_bytes: int = 8 * 1024 * MiB, timeout_s: float = 60.0):
        self.max_bytes, self.timeout_s = max_bytes, timeout_s

    def download(self, uri: str, local: Path, version: str | None = None, sha256: str | None = None) -> None:
        """Stream uri into local (appearing complete and verified, or not at all)."""
        url, _ = split_sha256(uri)
        expected = expected_sha256(uri, sha256)  # a malformed one is refused before any request
        with atomic_path(local) as tmp, open(tmp, "wb") as out:
            digest = self._stream(url, out)
            if expected and digest != expected:
                raise StorageError(f"{url}: SHA-256 {digest} does not match the expected {expected}")

    def read_bytes(self, uri: str, sha256: str | None = None) -> bytes:
        """The content, through a temporary file: the peak is one copy, not the chunks and their join."""
        with tempfile.TemporaryDirectory(prefix="posetune-http-") as folder:
            path = Path(folder, "download")
            self.download(uri, path, sha256=sha256)
            return path.read_bytes()

    def _stream(self, url: str, out) -> str:
        """Copy the response body into `out` chunk by chunk; returns its SHA-256."""
        digest, size = hashlib.sha256(), 0
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
                    out.write(chunk)
                if length and size < int(length):  # read(n) returns b"" at an early close, no error
                    raise http.client.IncompleteRead(b"", int(length) - size)
        except urllib.error.HTTPError as exc:
            raise StorageError(f"{url}: the server answered {exc.code} {exc.reason}") from None
        except TimeoutError:
            raise StorageError(f"{url}: no data for {self.timeout_s:g} s (timed out)") from None
        except urllib.error.URLError as exc:  # before the response: DNS, refused, TLS handshake
            raise StorageError(f"{url} cannot be reached: {exc.reason}") from None
        except http.client.IncompleteRead as exc:
            missing = f", {exc.expected} more were announced" if exc.expected else ""
            raise StorageError(
                f"{url}: the server closed the connection early (after {size + len(exc.partial)} bytes{missing})"
            ) from None
        except ssl.SSLError as exc:  # before OSError: it is one
            raise StorageError(f"{url}: TLS error during the download ({exc.reason or exc})") from None
        except (http.client.HTTPException, OSError) as exc:  # reset, broken pipe, bad status line
            raise StorageError(f"{url}: the download failed after {size} bytes ({type(exc).__name__}: {exc})") from None
        return digest.hexdigest()

    def _oversize(self, url: str, size: int) -> str:
        return f"{url} is larger than the {self.max_bytes / MiB:g} MiB download limit ({size / MiB:.1f} MiB or more)"

    def write_bytes(self, uri: str, data: bytes) -> None:
        raise StorageError(f"{uri}: http(s):// locations are read only; write to a local path or gs://")

    upload = copy = remove_tree = write_bytes  # type: ignore[assignment]

    def exists(self, uri: str) -> bool:
        return True  # known only by downloading; a missing file is an error when read

    def list_files(self, uri: str) -> dict[str, str]:
        """The URL as its own version: a server gives no version posetune can trust
        (ETag and Last-Modified are optional and often absent), so a fetched copy is kept until
        the URL changes (see fetch_dataset)."""
        return {"": split_sha256(uri)[0]}

    def describe(self) -> str:
        return "HTTP(S)"
