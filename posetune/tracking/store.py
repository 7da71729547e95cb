"""Where MLflow runs go and how calls reach them: the tracking URI, the embedded SQLite store,
the check that runs can be logged before anything trains, the MLflow client and the
``AsyncLogger`` every run logs through.

Tracking URI, in priority order: an explicit ``tracking.tracking_uri`` (config or search
file) > ``$MLFLOW_TRACKING_URI`` > the embedded SQLite store ``runs/mlflow.db`` (artifacts
in ``runs/mlartifacts``), which needs no server and is what ``posetune ui`` opens.

Calls go through ``AsyncLogger``, a background thread that applies them in order and keeps
retrying while the server is away: training never waits on tracking, and a restarted server
catches up. A call the store refuses (an upload it cannot write, a rejected value, a local file
that is gone) is reported, not retried for ever: it would hold up every call behind it.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
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


def server_probe(uri: str) -> Callable[[], bool] | None:
    """For a tracking server, a check that it answers /health: a call that failed as if the
    server were away while it answers failed on its own (a reset upload), and is not retried
    for ever. None for a store without a server."""
    if not uri.startswith(("http://", "https://")):
        return None

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
                response.read()
        except OSError:  # URLError too
            return False
        return True

    return answers


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

# How a failed call is retried (``failure_kind``): an OUTAGE (the server cannot be reached) until it
# goes through or ``close`` gives up; a BRIEF error (the server answered 500 or 429, or SQLite was
# locked) for ``BRIEF_RETRY_S`` at most; a PERMANENT one (a rejected value, a missing or unreadable
# local file, a full disk) not at all. The queue is ordered: every call waits behind the one being
# retried, so only a server that is away may hold it up for long.
OUTAGE, BRIEF, PERMANENT = "outage", "brief", "permanent"
BRIEF_RETRY_S = 30.0  # a few backoffs: an overloaded server recovers; an unwritable artifact root never does

# OSErrors about local files: the same call fails the same way again.
_PERMANENT_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.EACCES,
        errno.EPERM,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ENAMETOOLONG,
        errno.EFBIG,
        errno.EEXIST,
        errno.ENOTEMPTY,
        errno.ELOOP,
        errno.EBADF,
    }
)
# OSErrors of a network that is down or a server that is away (ConnectionError and TimeoutError
# cover refused, reset and timed-out connections).
_OUTAGE_ERRNOS = frozenset(
    {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN, errno.EAGAIN, errno.EADDRNOTAVAIL}
)


class AsyncLogger:
    """Applies MLflow calls in order on a background thread: a call the store could not take
    is retried with backoff as ``failure_kind`` says, and reported in ``failed`` when it never
    went through."""

    def __init__(
        self,
        max_backoff_s: float = 15.0,
        brief_retry_s: float | None = None,
        server_answers: Callable[[], bool] | None = None,  # ``server_probe``'s check
    ):
        self._queue: queue.Queue = queue.Queue()
        self._server_answers = server_answers
        self._max_backoff = max_backoff_s
        self._brief_retry_s = BRIEF_RETRY_S if brief_retry_s is None else brief_retry_s
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
        backoff, down, tries, brief_since = 1.0, False, 0, None
        while True:
            try:
                call()
            except Exception as exc:  # classified below
                kind, reason, tries = failure_kind(exc), _reason(exc), tries + 1
                if kind == OUTAGE and self._server_answers is not None and self._server_answers():
                    kind = BRIEF  # the server is there: this call fails on its own
                if kind == PERMANENT:
                    self._fail(f"{what}: {reason}")
                    return
                if self._closing.is_set():
                    self._fail(f"{what} (gave up: {reason[:120]})")
                    return
                if kind == OUTAGE:
                    brief_since = None  # the server's own errors are timed from when it is back
                    if not down:
                        down = True
                        self.outages += 1
                        log.warning("MLflow unavailable (%s); retrying in the background", reason[:200])
                elif brief_since is None:
                    brief_since = time.monotonic()
                    log.warning("MLflow: %s failed (%s); retrying for %.0f s", what, reason[:200], self._brief_retry_s)
                elif time.monotonic() - brief_since >= self._brief_retry_s:
                    self._fail(f"{what}: {reason} (still failing after {tries} tries)")
                    return
                self._closing.wait(backoff)
                backoff = min(self._max_backoff, backoff * 2)
                continue
            if down:
                log.info("MLflow reachable again; catching up")
            return

    def _fail(self, message: str) -> None:
        self.failed.append(message)
        log.warning("MLflow: could not log %s", message)


def _reason(exc: BaseException) -> str:
    """Why a call failed, in one short line: for MLflow's connection errors the endpoint and
    urllib3's cause, not the pool's repr."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    found = re.search(r"API request to (\S+) failed with exception .*\(Caused by (.*)\)", line)
    if found:
        line = f"{found.group(2)} from {urllib.parse.urlsplit(found.group(1)).path}"
    return line[:300]


def failure_kind(exc: BaseException) -> str:
    """OUTAGE, BRIEF or PERMANENT: how a failed MLflow call is retried (see ``BRIEF_RETRY_S``)."""
    status = _http_status(exc)
    if status is not None:
        if status in (502, 503, 504):  # a proxy whose server is away (restarting, not up yet)
            return OUTAGE
        return BRIEF if status == 429 or status >= 500 else PERMANENT
    text = str(exc)
    if "database is locked" in text:
        return BRIEF
    if "failed with exception" in text:  # MLflow's wording for a connection that failed
        return OUTAGE
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)) or _requests_outage(exc):
        return OUTAGE
    if isinstance(exc, OSError):
        if exc.errno in _PERMANENT_ERRNOS:
            return PERMANENT
        # An unknown OSError may be either: retried a while, never for ever.
        return OUTAGE if exc.errno in _OUTAGE_ERRNOS else BRIEF
    return PERMANENT


def _transient(exc: Exception) -> bool:
    """Worth retrying at all (the flat layout's name; see ``failure_kind``)."""
    return failure_kind(exc) != PERMANENT


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status a server answered the call with, when it answered one."""
    text = str(exc)
    found = re.search(r"failed with error code (\d{3})|too many (\d{3}) error responses", text)
    if found:
        return int(found.group(1) or found.group(2))
    response = getattr(exc, "response", None)  # requests.HTTPError
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return status
    exceptions = sys.modules.get("mlflow.exceptions")  # loaded whenever MLflow raised it
    if exceptions is not None and isinstance(exc, exceptions.RestException):
        return exc.get_http_status_code()  # the server's JSON error (RESOURCE_DOES_NOT_EXIST: 404)
    return None


def _requests_outage(exc: BaseException) -> bool:
    """requests' connection errors and timeouts are OSErrors without an errno."""
    requests = sys.modules.get("requests")
    return requests is not None and isinstance(exc, (requests.ConnectionError, requests.Timeout))
