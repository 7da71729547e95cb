"""The storage module against the real things: local files, a GCS emulator and an HTTP server,
all on this machine."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import typing

import pytest
import torch

from posetune import storage
from posetune.errors import CheckpointError, StorageError
from posetune.train.checkpoint import load_checkpoint, save_checkpoint

from helpers import FaultyGCS

# --- Local ------------------------------------------------------------------------------------


def test_local_round_trip_and_atomic_writes(tmp_path):
    target = str(tmp_path / "a" / "b.txt")
    storage.write_text(target, "one")
    assert storage.read_text(target) == "one" and storage.exists(target)
    assert list(storage.list_files(tmp_path / "a")) == ["b.txt"]
    storage.copy(target, tmp_path / "c.txt")
    assert (tmp_path / "c.txt").read_text() == "one"
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")]  # no temporaries left
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(tmp_path / "missing")


def test_unknown_scheme_and_remote_where_local_is_required():
    with pytest.raises(StorageError, match=r"unsupported scheme s4:// \(supported: local paths, file://, gs://"):
        storage.read_bytes("s4://bucket/key")
    with pytest.raises(StorageError, match=r"system\.out_dir must be a local folder or file, got gs://b/x"):
        storage.local_path("gs://b/x", "system.out_dir")


def test_join_keeps_schemes():
    assert storage.join("gs://b/searches/", "q", "results.json") == "gs://b/searches/q/results.json"
    assert storage.join("/tmp/x", "y") == "/tmp/x/y"
    assert storage.name_of("https://h/m/model.pt#sha256=ab") == "model.pt"


# --- gs:// --------------------------------------------------------------------------------------


def test_gcs_read_write_list_copy(gcs, bucket, tmp_path):
    root = f"gs://{bucket}/exp"
    storage.write_text(f"{root}/results.json", '{"trials": []}')
    storage.write_bytes(f"{root}/train/t1/best.pt", b"weights")
    assert storage.read_text(f"{root}/results.json") == '{"trials": []}'
    assert storage.exists(root) and storage.exists(f"{root}/results.json") and not storage.exists(f"{root}/nope")
    assert sorted(storage.list_files(root)) == ["results.json", "train/t1/best.pt"]
    assert list(storage.list_files(f"{root}/results.json")) == [""]  # one object
    storage.copy(f"{root}/train/t1/best.pt", f"{root}/best/model.pt")  # within the bucket
    storage.copy(f"{root}/best/model.pt", tmp_path / "local.pt")  # down
    storage.copy(tmp_path / "local.pt", f"{root}/up.pt")  # up
    assert storage.read_bytes(f"{root}/up.pt") == b"weights"
    with pytest.raises(StorageError, match=f"gs://{bucket}/exp/missing.pt: no such object"):
        storage.read_bytes(f"{root}/missing.pt")
    with storage.local_copy(f"{root}/best/model.pt") as local:
        assert local.read_bytes() == b"weights" and local.name == "model.pt"
    assert not local.exists()  # the temporary download is gone


def test_gcs_large_file_is_uploaded_resumably_and_verified(gcs, bucket, tmp_path):
    data = os.urandom(storage.GCSStorage.RESUMABLE_CHUNK * 2 + 12345)
    (tmp_path / "big.bin").write_bytes(data)
    storage.copy(tmp_path / "big.bin", f"gs://{bucket}/big.bin")
    blob = gcs.client.bucket(bucket).get_blob("big.bin")
    assert blob.size == len(data)
    storage.copy(f"gs://{bucket}/big.bin", tmp_path / "back.bin")  # CRC32C-checked download
    assert (tmp_path / "back.bin").read_bytes() == data


def test_checkpoint_save_and_load_on_gcs(gcs, bucket):
    uri = f"gs://{bucket}/runs/r/checkpoints/best.pt"
    save_checkpoint({"model": {"w": torch.arange(4.0)}, "config": {}}, uri)
    assert torch.equal(load_checkpoint(uri)["model"]["w"], torch.arange(4.0))
    with pytest.raises(CheckpointError, match="no such object"):
        load_checkpoint(f"gs://{bucket}/runs/r/checkpoints/last.pt")


def test_ray_storage_is_a_pyarrow_filesystem_on_the_same_bucket(gcs, bucket):
    storage_path, filesystem = storage.ray_storage(f"gs://{bucket}/searches/q")
    assert storage_path == f"{bucket}/searches/q"
    with filesystem.open_output_stream(f"{storage_path}/from-pyarrow.txt") as out:
        out.write(b"ray wrote this")
    assert storage.read_text(f"gs://{bucket}/searches/q/from-pyarrow.txt") == "ray wrote this"
    assert storage.from_ray_path(f"gs://{bucket}/x", f"{bucket}/x/ck") == f"gs://{bucket}/x/ck"


@pytest.fixture
def faulty_gcs(gcs, monkeypatch):
    """The emulator behind a front that misbehaves on purpose (helpers.FaultyGCS), and a
    GCSStorage whose client talks to that front."""
    proxy = FaultyGCS(gcs.host)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.host)
    yield proxy, storage.GCSStorage()
    proxy.close()


def test_gcs_crc32c_mismatch_is_a_storage_error_and_leaves_nothing(faulty_gcs, bucket, tmp_path):
    proxy, store = faulty_gcs
    store.write_bytes(f"gs://{bucket}/best.pt", b"weights" * 1000)
    proxy.corrupt = "best.pt"  # the bytes on the wire differ from the object's CRC32C
    with pytest.raises(StorageError, match=rf"gs://{bucket}/best.pt: the data arrived corrupted \(CRC32C mismatch\)"):
        store.read_bytes(f"gs://{bucket}/best.pt")
    with pytest.raises(StorageError, match="CRC32C mismatch"):
        store.download(f"gs://{bucket}/best.pt", tmp_path / "best.pt")
    assert list(tmp_path.iterdir()) == []
    proxy.corrupt = None
    assert store.read_bytes(f"gs://{bucket}/best.pt") == b"weights" * 1000


def test_gcs_copy_retries_transient_errors(faulty_gcs, bucket):
    """The copy that exports best/model.pt: a 503 (and then a 429) from the server is retried by the
    library (a precondition on the source's generation makes the retry safe), not an error."""
    proxy, store = faulty_gcs
    store.write_bytes(f"gs://{bucket}/trial/best.pt", b"weights")
    proxy.fail["/copyTo/"] = [503, 429]
    store.copy(f"gs://{bucket}/trial/best.pt", f"gs://{bucket}/best/model.pt")
    assert store.read_bytes(f"gs://{bucket}/best/model.pt") == b"weights"
    assert sum("/copyTo/" in path for _, path in proxy.requests) == 3
    with pytest.raises(StorageError, match="no such object"):
        store.copy(f"gs://{bucket}/trial/missing.pt", f"gs://{bucket}/best/model.pt")


@pytest.mark.parametrize("name", ["Bad_Bucket!", "ab", "-starts-with-a-dash", "UPPER", "a" * 64])
def test_gcs_bucket_names_are_checked_before_any_request(name):
    """No client is made (no credentials needed) and the library's ValueError never shows."""
    with pytest.raises(
        StorageError, match=rf"gs://{re.escape(name)}/x: '{re.escape(name)}' is not a bucket name \(3-63"
    ):
        storage.list_files(f"gs://{name}/x")


# --- http(s):// ----------------------------------------------------------------------------------


class _Files(http.server.BaseHTTPRequestHandler):
    files: typing.ClassVar[dict[str, bytes]] = {}
    requests: typing.ClassVar[list[str]] = []

    def do_GET(self):
        self.requests.append(self.path)
        if self.path in ("/short", "/reset", "/garbled"):  # announce 4 MiB, send 256 KiB, then break
            self.send_response(200)
            self.send_header("Content-Length", str(4 * storage.MiB))
            self.end_headers()
            self.wfile.write(b"z" * 262144)
            self.wfile.flush()
            if self.path == "/reset":  # an RST, not a FIN: the reader gets ECONNRESET
                time.sleep(0.2)
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if self.path == "/garbled":  # bytes outside any TLS record: the client's TLS layer fails
                time.sleep(0.2)
                os.write(self.connection.fileno(), b"\x17\x03\x03\x00\x10" + b"not a tls record" * 4)
                time.sleep(0.5)
            self.close_connection = True
            return
        if self.path == "/slow":
            time.sleep(3)
        if self.path == "/endless":  # no Content-Length: only the streamed count can stop it
            self.send_response(200)
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"x" * 65536)
            return
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the client hung up on purpose (the timeout and size-cap tests)


def _serving(server, scheme: str):
    """Serve _Files on a thread while the fixture's test runs; then stop and forget them."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"{scheme}://127.0.0.1:{server.server_address[1]}", _Files.files
    server.shutdown()
    server.server_close()
    _Files.files.clear()
    _Files.requests.clear()


@pytest.fixture
def http_server(tmp_path):
    yield from _serving(_QuietServer(("127.0.0.1", 0), _Files), "http")


@pytest.fixture
def https_server(tmp_path_factory, monkeypatch):
    """The same files over TLS, with a self-signed certificate the client is told to trust
    (SSL_CERT_FILE, which OpenSSL reads when urllib makes its default context)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    files = ["-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", *subject, *files],
        check=True,
        capture_output=True,
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    server = _QuietServer(("127.0.0.1", 0), _Files)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    yield from _serving(server, "https")


def test_http_checkpoint_download_with_sha256(http_server, tmp_path):
    url, files = http_server
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    files["/m.pt"] = data
    good = hashlib.sha256(data).hexdigest()
    assert torch.equal(load_checkpoint(f"{url}/m.pt")["model"]["w"], torch.ones(3))
    assert torch.equal(load_checkpoint(f"{url}/m.pt#sha256={good}")["model"]["w"], torch.ones(3))
    assert load_checkpoint(f"{url}/m.pt", sha256=good.upper())["format"] == "posetune-checkpoint"
    with pytest.raises(CheckpointError, match=f"SHA-256 {good} does not match the expected 00ff"):
        load_checkpoint(f"{url}/m.pt#sha256={'00ff' * 16}")
    with pytest.raises(CheckpointError, match="answered 404"):
        load_checkpoint(f"{url}/missing.pt")
    with pytest.raises(StorageError, match="read only"):
        storage.write_bytes(f"{url}/m.pt", b"x")


def test_http_size_cap_and_timeout(http_server, tmp_path):
    url, files = http_server
    files["/big"] = b"y" * 5000
    small = storage.HTTPStorage(max_bytes=1000, timeout_s=1)
    with pytest.raises(StorageError, match=r"larger than the .* MiB download limit"):
        small.read_bytes(f"{url}/big")  # refused from its Content-Length
    with pytest.raises(StorageError, match="download limit"):
        small.read_bytes(f"{url}/endless")  # refused while streaming
    with pytest.raises(StorageError, match=r"no data for 1 s \(timed out\)"):
        small.read_bytes(f"{url}/slow")
    target = tmp_path / "out.pt"
    with pytest.raises(StorageError):
        small.download(f"{url}/endless", target)
    assert list(tmp_path.iterdir()) == []  # nothing left behind


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/short", r"closed the connection early \(after 262144 bytes, \d+ more were announced\)"),
        ("/reset", r"(download failed after \d+ bytes \(ConnectionResetError|closed the connection early)"),
    ],
)
def test_http_broken_transfers_are_one_error_and_leave_nothing(http_server, tmp_path, path, message):
    """A server that closes early (http.client.IncompleteRead) or resets the connection: one
    StorageError naming the URL, no partial file, for downloads and checkpoint loads alike."""
    url, _ = http_server
    with pytest.raises(StorageError, match=message):
        storage.HTTPStorage().download(f"{url}{path}", tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=f"checkpoint {url}{path}: {url}{path}"):
        load_checkpoint(f"{url}{path}")
    assert list(tmp_path.iterdir()) == []


def test_https_tls_error_mid_download_is_one_error(https_server, tmp_path):
    url, files = https_server
    files["/m.pt"] = b"fine"
    assert storage.read_bytes(f"{url}/m.pt") == b"fine"  # the certificate is trusted: TLS works
    with pytest.raises(StorageError, match=f"{url}/garbled: TLS error during the download"):
        storage.HTTPStorage().download(f"{url}/garbled", tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


def test_http_download_streams_to_disk_not_memory(http_server, tmp_path):
    """A 48 MiB checkpoint download peaks at a chunk or two of Python memory, not the whole
    file (the old join of chunks held about twice its size)."""
    import tracemalloc

    url, files = http_server
    data = os.urandom(48 * storage.MiB)
    files["/big.pt"] = data
    tracemalloc.start()
    try:
        with storage.local_copy(f"{url}/big.pt", hashlib.sha256(data).hexdigest()) as local:
            _, peak = tracemalloc.get_traced_memory()
            assert local.stat().st_size == len(data)
    finally:
        tracemalloc.stop()
    assert peak < 8 * storage.MiB, f"peak {peak / storage.MiB:.0f} MiB"


def test_malformed_sha256_is_refused_before_downloading(http_server, tmp_path):
    url, files = http_server
    files["/m.pt"] = b"x"
    for uri, sha256 in [(f"{url}/m.pt", "xyz"), (f"{url}/m.pt#sha256=12", None), (f"{url}/m.pt", "g" * 64)]:
        with pytest.raises(StorageError, match="must be 64 hexadecimal digits"):
            storage.read_bytes(uri, sha256)
    (tmp_path / "m.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"must be 64 hexadecimal digits, .*; got 'xyz'"):
        load_checkpoint(tmp_path / "m.pt", sha256="xyz")
    assert _Files.requests == []  # nothing was asked of the server


def test_https_dataset_is_fetched_once_per_url(http_server, synth_small, tmp_path):
    """What the docs promise for https:// datasets: one download per URL and node, however the
    server's file changes (a server gives no version to compare); a new URL is a new fetch."""
    from posetune.data.fetch import fetch_dataset
    from posetune.data.tools import zip_folder

    url, files = http_server
    zip_folder(synth_small, ["train", "val"], tmp_path / "d.zip")
    files["/v1/d.zip"] = files["/v2/d.zip"] = (tmp_path / "d.zip").read_bytes()
    local = fetch_dataset(f"{url}/v1/d.zip", tmp_path / "cache")
    assert local.name == "d.zip" and local.read_bytes() == files["/v1/d.zip"]
    files["/v1/d.zip"] = b"changed on the server"
    assert fetch_dataset(f"{url}/v1/d.zip", tmp_path / "cache") == local
    assert local.read_bytes() == files["/v2/d.zip"] and _Files.requests == ["/v1/d.zip"]
    assert fetch_dataset(f"{url}/v2/d.zip", tmp_path / "cache") != local and _Files.requests[-1] == "/v2/d.zip"


def test_cli_refuses_a_malformed_sha256_before_downloading(http_server, tmp_path):
    url, files = http_server
    files["/m.pt"] = b"not even a checkpoint"
    proc = subprocess.run(
        [sys.executable, "-m", "posetune", "evaluate", "--checkpoint", f"{url}/m.pt", "--sha256", "xyz"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"posetune: error: checkpoint {url}/m.pt: {url}/m.pt: the expected SHA-256 (--sha256 or #sha256=) must be "
        "64 hexadecimal digits, as `sha256sum FILE` prints them; got 'xyz'"
    ]
    assert _Files.requests == [] and list(tmp_path.iterdir()) == []


def test_cli_refuses_a_checkpoint_whose_sha256_differs(http_server, tmp_path):
    url, files = http_server
    files["/m.pt"] = b"not even a checkpoint"
    proc = subprocess.run(
        [sys.executable, "-m", "posetune", "evaluate", "--checkpoint", f"{url}/m.pt", "--sha256", "ab" * 32],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "does not match the expected abab" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_results_json_in_a_failing_bucket_never_stops_the_search(faulty_gcs, bucket, monkeypatch):
    """Every event returns at once while the bucket refuses writes; the end says results.json
    is behind, and why; once writes work again the file holds the last state."""
    from posetune.search.results import Outcome, SearchResults, TrialEnded, TrialReported, TrialStarted

    proxy, store = faulty_gcs
    monkeypatch.setitem(storage._instances, "gs", store)  # the module's functions go through the front
    monkeypatch.setattr("posetune.search.results.ENDED_WRITE_WAIT_S", 0.5)
    uri = f"gs://{bucket}/searches/s/results.json"
    results = SearchResults(uri, "pose_error", "min", {})
    proxy.fail["uploadType"] = [403] * 1000  # every upload refused, a permanent error (not retried by the library)
    params = {"optimizer.lr": 1e-3}
    start = time.monotonic()
    results.on_event(TrialStarted("a", params, None))
    for samples in range(96, 960, 96):  # a burst of reports
        results.on_event(TrialReported("a", params, samples, {"pose_error": 10.0 - samples / 96}, None))
    results.on_event(TrialEnded("a", params, Outcome.COMPLETED, 864, None, None, {}))
    assert time.monotonic() - start < 5  # nothing waited on the bucket (the end: at most 0.5 s)
    problem = results.flush(timeout=2)
    assert problem and "403" in problem, problem
    assert not store.exists(uri)
    proxy.fail.clear()
    assert results.flush(timeout=60) is None
    (record,) = json.loads(store.read_bytes(uri))["trials"]
    assert record["status"] == "completed" and record["samples_seen"] == 864
    uploads = [path for method, path in proxy.requests if "uploadType" in path]
    assert len(uploads) < 12  # the burst collapsed into a few writes, not one per event
