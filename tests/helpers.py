"""Plain helpers the tests import (fixtures live in conftest.py): search spaces small enough
for a trial to train in seconds, waiting and Ray-process checks, free ports, the GCS emulator's
client, a real MLflow server, and hand-made Perception datasets."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from PIL import Image

from posetune.data import synth

REPO = Path(__file__).resolve().parents[1]


# --- Tiny searches ------------------------------------------------------------------------------


def tiny_space(tmp_path: Path, data: Path, name: str = "t", overrides: dict | None = None, **sections) -> Path:
    """A search-space file over `data` (96 train / 32 val frames): 96 samples per epoch.
    `overrides` adds base config overrides; `section__key=value` replaces a search-file key."""
    space = {
        "base": {
            "config": str(REPO / "configs" / "quick.yaml"),
            "overrides": {
                "dataset.root": str(data),
                "dataset.image_scale": "64x40",
                "dataset.cache_dir": str(tmp_path / "cache"),
                "dataset.num_workers": 0,
                "train.batch_size": 16,
                "val.eval_freq": 1,
            },
        },
        "parameters": {
            "optimizer.lr": {"distribution": "loguniform", "low": 1e-4, "high": 3e-3},
            "train.beta_loss": {"distribution": "uniform", "low": 0.5, "high": 2.0},
        },
        "search": {
            "num_samples": 4,
            "max_concurrent_trials": 1,
            "points_to_evaluate": [
                {"optimizer.lr": 3e-3, "train.beta_loss": 1.0},
                {"optimizer.lr": 1e-4, "train.beta_loss": 1.0},
            ],
            "asha": {"max_samples": 384, "grace_samples": 96, "reduction_factor": 2},
        },
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 0.95, "local_cpus": 2},
        "storage": {"name": name, "path": str(tmp_path / "runs"), "keep_checkpoints": 2},
    }
    space["base"]["overrides"].update(overrides or {})
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        space[section][key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def read_results(tmp_path: Path, name: str = "t") -> list[dict]:
    path = tmp_path / "runs" / name / "results.json"
    return json.loads(path.read_text())["trials"] if path.exists() else []


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def ray_processes() -> list[int]:
    import psutil

    pids = []
    for process in psutil.process_iter(["name", "cmdline"]):
        text = " ".join(process.info["cmdline"] or []) + " " + (process.info["name"] or "")
        if "raylet" in text or "gcs_server" in text:
            pids.append(process.pid)
    return pids


def kill_ray_leftovers() -> None:
    for pid in ray_processes():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --- Servers on 127.0.0.1 ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GCSEmulator:
    """A real GCS JSON API (gcp-storage-emulator) on 127.0.0.1; google-cloud-storage and
    pyarrow reach it through STORAGE_EMULATOR_HOST, as posetune's storage module does."""

    def __init__(self, host: str):
        self.host = host
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            self._client = storage.Client(credentials=AnonymousCredentials(), project="test")
        return self._client

    def bucket(self, name: str):
        """A new, empty bucket (names are unique per test)."""
        return self.client.create_bucket(name)

    def names(self, bucket: str, prefix: str = "") -> list[str]:
        return sorted(blob.name for blob in self.client.list_blobs(bucket, prefix=prefix))


class FaultyGCS:
    """A local HTTP front for the GCS emulator that misbehaves on purpose; point
    STORAGE_EMULATOR_HOST at `host`. It forwards every request, except that:
    - `fail[substring]` lists statuses to answer, one per request whose path holds substring;
    - `corrupt` (a substring) flips one byte of the body of matching media downloads, leaving
      the object's real CRC32C in x-goog-hash;
    - `pin_generations` answers ?generation=G as GCS does when G is no longer the object's
      generation (404): the emulator ignores the parameter;
    - `media_delay_s` holds each media download that long (so that parallel ones overlap);
    - `hold(method, path)`, when set and true, holds the request until `release` is set and then
      answers 503 (an upload cut off mid-way); `held` lists the paths it held.
    `requests` records (method, path) of everything it received, `max_in_flight` the most
    requests it served at once."""

    HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})

    def __init__(self, upstream: str):
        import http.server
        import threading
        import urllib.parse

        self.upstream = urllib.parse.urlsplit(upstream).netloc
        self.fail: dict[str, list[int]] = {}
        self.corrupt: str | None = None
        self.pin_generations = False
        self.media_delay_s = 0.0
        self.hold = None
        self.held: list[str] = []
        self.release = threading.Event()
        self.requests: list[tuple[str, str]] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self):
                with proxy._lock:
                    proxy.requests.append((self.command, self.path))
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    self._serve()
                finally:
                    with proxy._lock:
                        proxy.in_flight -= 1

            def _serve(self):
                if "alt=media" in self.path:
                    time.sleep(proxy.media_delay_s)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = proxy._planned_failure(self.path)
                if proxy.hold and proxy.hold(self.command, self.path):
                    proxy.held.append(self.path)
                    proxy.release.wait()
                    status = 503
                if status is None and proxy.pin_generations:
                    status = proxy._stale_generation(self.path)
                if status is not None:
                    payload = json.dumps({"error": {"code": status, "message": "injected by FaultyGCS"}}).encode()
                    self._answer(status, [("Content-Type", "application/json")], payload)
                    return
                status, headers, payload = proxy._forward(self.command, self.path, dict(self.headers), body)
                if proxy.corrupt and proxy.corrupt in self.path and "alt=media" in self.path and payload:
                    payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
                self._answer(status, headers, payload)

            def _answer(self, status, headers, payload):
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in proxy.HOP:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def media_downloads(self) -> list[str]:
        """The paths of the object downloads it received, in order."""
        return [path for method, path in self.requests if method == "GET" and "alt=media" in path]

    def _planned_failure(self, path: str) -> int | None:
        for substring, statuses in self.fail.items():
            if substring in path and statuses:
                return statuses.pop(0)
        return None

    def _forward(self, method: str, path: str, headers: dict, body: bytes):
        import http.client

        connection = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in headers.items() if k.lower() not in self.HOP}
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    def _stale_generation(self, path: str) -> int | None:
        import urllib.parse

        url = urllib.parse.urlsplit(path)
        asked = urllib.parse.parse_qs(url.query).get("generation")
        if not asked or "/o/" not in url.path:
            return None
        metadata = url.path.removeprefix("/download")  # the object's metadata, its current generation
        status, _, payload = self._forward("GET", metadata, {}, b"")
        current = json.loads(payload).get("generation") if status == 200 else None
        return None if current == asked[0] else 404

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


# --- Hand-made Perception datasets ----------------------------------------------------------


def write_png(path: Path, size=(64, 40), mode="RGB", colour=(120, 60, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = (*colour, 255) if mode == "RGBA" else colour
    Image.new(mode, size, fill).save(path)


def legacy_value(t=(0.1, -0.2, 1.7), q=(0.0, 0.7071068, 0.0, 0.7071068), label="cube_position", lists=False):
    if lists:
        return {
            "label_id": 1,
            "label_name": label,
            "instance_id": 1,
            "translation": list(t),
            "rotation": list(q),
        }
    return {
        "label_id": 1,
        "label_name": label,
        "instance_id": 1,
        "translation": dict(zip("xyz", t, strict=True)),
        "size": {"x": 0.1, "y": 0.1, "z": 0.1},
        "rotation": dict(zip("xyzw", q, strict=True)),
    }


def legacy_capture(filename: str, values: list) -> dict:
    return {
        "id": "c",
        "filename": filename,
        "format": "PNG",
        "annotations": [{"id": "a", "annotation_definition": synth.BOX3D_DEFINITION_ID, "values": values}],
    }


def write_legacy(split_dir: Path, files: list[list[dict]], mode="RGB", images=True) -> None:
    """One captures_NNN.json per entry of `files`; images written for every capture."""
    dataset = split_dir / "Dataset0000"
    dataset.mkdir(parents=True, exist_ok=True)
    for number, captures in enumerate(files):
        (dataset / f"captures_{number:03d}.json").write_text(json.dumps({"version": "0.0.1", "captures": captures}))
        for capture in captures:
            if images:
                write_png(split_dir / capture["filename"], mode=mode)


def write_solo(root: Path, frames: list[tuple[tuple, tuple]], label="cube_position") -> None:
    """A SOLO dataset with one sequence per frame; frames are (translation, quaternion)."""
    for n, (t, q) in enumerate(frames):
        folder = root / f"sequence.{n}"
        write_png(folder / "step0.camera.png")
        frame = {
            "frame": n,
            "sequence": n,
            "step": 0,
            "captures": [
                {
                    "@type": "type.unity.com/unity.solo.RGBCamera",
                    "id": "camera",
                    "filename": "step0.camera.png",
                    "dimension": [64, 40],
                    "annotations": [
                        {
                            "@type": "type.unity.com/unity.solo.BoundingBox3DAnnotation",
                            "id": "bounding box 3D",
                            "values": [
                                {
                                    "instanceId": 1,
                                    "labelId": 1,
                                    "labelName": "other",
                                    "translation": [9, 9, 9],
                                    "rotation": [0, 0, 0, 1],
                                },
                                {
                                    "instanceId": 2,
                                    "labelId": 2,
                                    "labelName": label,
                                    "translation": list(t),
                                    "rotation": list(q),
                                },
                            ],
                        }
                    ],
                }
            ],
        }
        (folder / "step0.frame_data.json").write_text(json.dumps(frame))
    (root / "metadata.json").write_text("{}")


class MlflowServer:
    """`mlflow server` as a user starts it, on a free local port; can be killed and restarted."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.folder / "artifacts"),
        ]
        log = open(self.folder / "server.log", "a")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(command, stdout=log, stderr=log)
        wait_for(self.healthy, 120, "the MLflow server to start")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def refuse_uploads(self) -> None:
        """Make the server's artifact root a file: every upload it proxies then fails there and
        it answers 500, as when the disk it writes artifacts to is gone (chmod would not stop
        a root process)."""
        import shutil

        root = self.folder / "artifacts"
        shutil.rmtree(root, ignore_errors=True)
        root.write_text("not a folder\n")

    def stop(self) -> None:
        if self.process:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.process = None
