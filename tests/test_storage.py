"""The storage module against the real things: local files, a GCS emulator and an HTTP server,
all on this machine."""

from __future__ import annotations

import hashlib
import http.server
import os
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


# --- http(s):// ----------------------------------------------------------------------------------


class _Files(http.server.BaseHTTPRequestHandler):
    files: typing.ClassVar[dict[str, bytes]] = {}

    def do_GET(self):
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


@pytest.fixture
def http_server(tmp_path):
    server = _QuietServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Files.files
    server.shutdown()
    server.server_close()
    _Files.files.clear()


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
        load_checkpoint(f"{url}/m.pt#sha256=00ff")
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
