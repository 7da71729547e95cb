"""Where MLflow runs go and how calls reach them: the tracking URI, the embedded SQLite store,
the check that runs can be logged before anything trains, the MLflow client and the
``AsyncLogger`` every run logs through.

Tracking URI, in priority order: an explicit ``tracking.tracking_uri`` (config or search
file) > ``$MLFLOW_TRACKING_URI`` > the embedded SQLite store ``runs/mlflow.db`` (artifacts
in ``runs/mlartifacts``), which needs no server and is what ``posetune ui`` opens.

Calls go through ``AsyncLogger``, a background thread that applies them in order and keeps
retrying while the server is away: training never waits on tracking, and a restarted server
catches up.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posetune.errors import PosetuneError

log = logging.getLogger(__name__)

PROJECT_RUNS = Path("runs")  # the project's run folder, relative to the working directory

# --- Where runs go --------------------------------------------------------------------------


def embedded_store(runs: Path = PROJECT_RUNS) -> tuple[str, str]:
    """(tracking URI, artifact root) of the embedded SQLite store in the project's run folder."""
    runs = runs.resolve()
    return f"sqlite:///{runs / 'mlflow.db'}", str(runs / "mlartifacts")


def resolve_tracking_uri(explicit: str | None) -> str:
    """explicit setting > $MLFLOW_TRACKING_URI > the embedded SQLite store."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or embedded_store()[0]


def artifact_root_for(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: next to an embedded SQLite store; a server
    decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts")
    return None


def check_tracking_uri(uri: str, create: bool = True) -> None:
    """Fail before any training starts when runs cannot be logged. `create=False` checks an
    embedded store's folder without making it (nothing is written before training starts)."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PosetuneError(
                f"MLflow tracking server {uri} is not reachable ({reason}); start it, point "
                "tracking.tracking_uri / MLFLOW_TRACKING_URI elsewhere, or set tracking.enabled=false"
            ) from None
    elif uri.startswith("sqlite:///") and create:
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    elif uri.startswith("file:"):
        raise PosetuneError(
            f"tracking URI {uri}: MLflow 3 no longer accepts file stores; use sqlite:///PATH.db or http(s)://"
        )


def mlflow_client(uri: str):
    """An MlflowClient on `uri` (tracking and registry), with short HTTP retries."""
    # MLflow's own HTTP retries would block our logging thread for minutes per call; it
    # retries on its own schedule instead.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# MLflow 3's UI opens an experiment by this tag: its model-training view (the runs table),
# not the GenAI overview it shows untagged experiments.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id_for(client, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if "mlflow.experimentKind" not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return experiment.experiment_id
    root = artifact_root_for(uri)
    location = Path(root, name).as_uri() if root else None
    return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


# --- Background logging -----------------------------------------------------------------------


class AsyncLogger:
    """Applies MLflow calls in order on a background thread, retrying transient failures
    (server down, timeouts) with backoff until they succeed or ``close`` gives up on them."""

    def __init__(self, max_backoff_s: float = 15.0):
        self._queue: queue.Queue = queue.Queue()
        self._max_backoff = max_backoff_s
        self._closing = threading.Event()
        self._busy = False
        self.failed: list[str] = []  # what could not be logged, and why
        self.outages = 0
        self._thread = threading.Thread(target=self._run, name="posetune-mlflow", daemon=True)
        self._thread.start()

    def submit(self, what: str, call: Callable[[], Any]) -> None:
        self._queue.put((what, call))

    def close(self, timeout_s: float) -> list[str]:
        """Wait up to timeout_s for queued calls; report the ones that did not make it."""
        deadline = time.monotonic() + timeout_s
        while not self._queue.empty() or self._busy:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self._closing.set()
        self._queue.put(None)
        self._thread.join(timeout=max(1.0, deadline - time.monotonic() + 5))
        while True:  # whatever is still queued was not logged
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.failed.append(f"{item[0]} (gave up: tracking server unavailable at the end)")
        return self.failed

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._busy = True
            self._apply(*item)
            self._busy = False

    def _apply(self, what: str, call: Callable[[], Any]) -> None:
        backoff, down = 1.0, False
        while True:
            try:
                call()
            except Exception as exc:  # classified below
                if not _transient(exc):
                    self.failed.append(f"{what}: {str(exc).splitlines()[0][:200]}")
                    log.warning("MLflow: could not log %s: %s", what, str(exc).splitlines()[0][:200])
                    return
                if self._closing.is_set():
                    self.failed.append(f"{what} (gave up: {str(exc).splitlines()[0][:120]})")
                    return
                if not down:
                    down = True
                    self.outages += 1
                    log.warning("MLflow unavailable (%s); retrying in the background", str(exc).splitlines()[0][:100])
                time.sleep(backoff)
                backoff = min(self._max_backoff, backoff * 2)
                continue
            if down:
                log.info("MLflow reachable again; catching up")
            return


def _transient(exc: Exception) -> bool:
    """Worth retrying: the store could not be reached or was briefly overloaded. Anything else
    (a rejected value, a missing run, a bug) would fail the same way again."""
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return True
    text = str(exc)
    return (
        "failed with exception" in text  # MLflow's wording for a transport failure
        or re.search(r"failed with error code (429|5\d\d)", text) is not None
        or "database is locked" in text
    )
