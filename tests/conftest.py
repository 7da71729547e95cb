"""Shared fixtures: small datasets the tests generate themselves, an isolated cache, a local
Ray instance, the GCS emulator. Plain helpers are in helpers.py.

Markers (registered in pyproject.toml): `ray` starts Ray, `server` starts a server, `slow` takes
over ~20 s. Tests that use a fixture below which starts one get its marker here, not by hand;
`make test-fast` runs the tests that have none of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from posetune.data import synth

from helpers import GCSEmulator, free_port

# What a test starts when it asks for one of these fixtures (`two_nodes` is test_cluster.py's,
# `server` test_tracking.py's `mlflow server`, `http_server` and `https_server` test_storage.py's;
# the others are below).
MARKED_FIXTURES = {
    "ray_cluster": "ray",
    "two_nodes": "ray",
    "gcs": "server",
    "server": "server",
    "http_server": "server",
    "https_server": "server",
}


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture in set(item.fixturenames) & MARKED_FIXTURES.keys():
            item.add_marker(MARKED_FIXTURES[fixture])


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


@pytest.fixture
def server(tmp_path):
    """A real `mlflow server` on a free local port, stopped at the test's end."""
    from helpers import MlflowServer

    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()


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
