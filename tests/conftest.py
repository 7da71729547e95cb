"""Shared fixtures: small datasets the tests generate themselves, and an isolated cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from posetune.data import synth


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory, mlflow_store):
    """For the whole session (module and session fixtures included, and every process they
    start, Ray's too): never touch the user's ~/.cache, never write the checkout's own
    runs/mlflow.db, never pick up their POSETUNE_* variables."""
    import os

    checkout_store = Path(__file__).resolve().parents[1] / "runs" / "mlflow.db"
    before = checkout_store.stat().st_mtime_ns if checkout_store.exists() else None
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
        for name in list(os.environ):
            if name.startswith("POSETUNE_"):
                patch.delenv(name)
        yield
    after = checkout_store.stat().st_mtime_ns if checkout_store.exists() else None
    assert after == before, f"a test wrote the checkout's own {checkout_store}: tests write only under tmp"


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """A 96/32/16 synthetic dataset (train/val/test), shared by the whole session."""
    root = tmp_path_factory.mktemp("synth-small")
    synth.generate(root, {"train": 96, "val": 32, "test": 16}, seed=3)
    return root


@pytest.fixture(scope="session")
def synth_learn(tmp_path_factory) -> Path:
    """Enough synthetic frames for a short training run to learn something."""
    root = tmp_path_factory.mktemp("synth-learn")
    synth.generate(root, {"train": 800, "val": 150}, seed=1)
    return root


# --- Hand-made Perception fixtures ------------------------------------------------------------


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


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> str:
    """One embedded MLflow store for the whole session (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance with explicit CPUs for one test module, shut down after it."""
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=True,
        logging_level="WARNING",
        runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}},
    )
    yield ray
    ray.shutdown()


# --- Servers on 127.0.0.1 --------------------------------------------------------------------


def free_port() -> int:
    import socket

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


@pytest.fixture(scope="session")
def gcs():
    """One emulator for the session; every process started from the tests inherits its address."""
    import os
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    from posetune import storage

    port = free_port()
    command = shutil.which("gcp-storage-emulator", path=str(Path(sys.executable).parent))
    server = subprocess.Popen(
        [command, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    host = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{host}/storage/v1/b?project=test", timeout=2).read()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("the GCS emulator did not start") from None
            time.sleep(0.2)
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = host
    storage._instances.clear()  # clients made before this point talk to nothing
    yield GCSEmulator(host)
    server.terminate()
    server.wait(timeout=30)
    storage._instances.clear()
    if previous is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = previous


@pytest.fixture
def bucket(gcs, request) -> str:
    """A fresh bucket named after the test; returns its name."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:6]
    gcs.bucket(name)
    return name
