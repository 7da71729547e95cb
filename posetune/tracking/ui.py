"""`posetune ui`: the MLflow UI on the embedded store, and where each experiment's runs table is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from posetune.tracking.store import PROJECT_RUNS, embedded_store, mlflow_client


def start_ui(port: int, runs: Path = PROJECT_RUNS) -> subprocess.Popen:
    """The MLflow UI on the embedded store, bound to 127.0.0.1."""
    uri, artifacts = embedded_store(runs)
    Path(artifacts).mkdir(parents=True, exist_ok=True)
    # The same interpreter's MLflow: the `mlflow` script need not be on PATH.
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--default-artifact-root",
        artifacts,
        "--workers",
        "1",  # one person browsing: the default of 4 would crowd a laptop
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return subprocess.Popen(command)


def experiment_urls(port: int, runs: Path = PROJECT_RUNS) -> list[tuple[str, str]]:
    """(experiment name, URL of its runs table) for every experiment in the embedded store.
    MLflow 3 opens experiments on a GenAI overview page; the runs table is the useful view."""
    uri, _ = embedded_store(runs)
    if not Path(uri.removeprefix("sqlite:///")).exists():
        return []
    client = mlflow_client(uri)
    return [
        (e.name, f"http://127.0.0.1:{port}/#/experiments/{e.experiment_id}/runs")
        for e in client.search_experiments()
        if e.name != "Default"
    ]
