"""MLflow tracking: a parent run per search with one nested child run per trial (``SearchRun``,
a listener of the search's events in posetune.results), and one run per `posetune train`
(``TrainRun``). Both are context managers: a run closes itself as FINISHED, FAILED or KILLED.
Nothing here imports Ray, the search or the trials.

Everything is logged from the driver process: Tune already receives rank 0's metrics, so
there is exactly one writer and no MLflow state in training workers. Calls go through
``AsyncLogger``, a background thread that applies them in order and keeps retrying while the
server is away: training never waits on tracking, and a restarted server catches up. Run ids
live on disk (``tracking.json`` in the experiment folder), so a resumed search continues the
same parent and child runs instead of creating duplicates.

Tracking URI, in priority order: an explicit ``tracking.tracking_uri`` (config or search
file) > ``$MLFLOW_TRACKING_URI`` > the embedded SQLite store ``runs/mlflow.db`` (artifacts
in ``runs/mlartifacts``), which needs no server and is what ``posetune ui`` opens.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from posetune import storage
from posetune.config import Config, TrackingConfig, flatten
from posetune.errors import PosetuneError, TrainingDiverged
from posetune.search.results import (
    REPORTED,
    Outcome,
    SearchEnded,
    SearchEvent,
    SearchStarted,
    SearchSummary,
    TrialEnded,
    TrialReported,
    TrialStarted,
)

log = logging.getLogger(__name__)

PROJECT_RUNS = Path("runs")  # the project's run folder, relative to the working directory
STATE_FILE = "tracking.json"


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


def _client(uri: str):
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


def _metrics_batch(metrics: dict[str, Any], step: int, keys: Iterable[str] = REPORTED):
    """The finite numbers among `metrics` whose names are in `keys`, as MLflow metrics."""
    from mlflow.entities import Metric

    now, keys = int(time.time() * 1000), set(keys)
    return [
        Metric(key, float(value), now, step)
        for key, value in metrics.items()
        if key in keys and isinstance(value, (int, float)) and math.isfinite(value)
    ]


def _params(flat: dict[str, Any]):
    from mlflow.entities import Param

    return [Param(key, "null" if value is None else str(value)[:6000]) for key, value in sorted(flat.items())]


def log_params(client, run_id: str, flat: dict[str, Any]) -> None:
    params = _params(flat)
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[start : start + 100])


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def posetune_tags() -> dict[str, str]:
    from importlib.metadata import version

    return {"posetune.version": version("posetune"), "posetune.git_commit": git_commit()}


# --- A search: parent run, child runs ---------------------------------------------------------


class SearchRun:
    """A search's parent run, with one child run per trial. It listens to the search's events
    and, as a context manager, closes the parent run: FINISHED, KILLED (interrupted) or FAILED.

    Run ids live in tracking.json in the experiment folder, so a resumed search continues the
    same parent and child runs. Calls after the parent run is opened go through an
    ``AsyncLogger``: the search never waits on MLflow."""

    def __init__(self, settings: TrackingConfig, name: str, folder: str, space_file: str, params: dict[str, Any]):
        self.uri = resolve_tracking_uri(settings.tracking_uri)
        self.experiment_name = settings.experiment_name or name
        self.model_name = settings.registered_model_name or f"posetune-{name}"
        self.log_checkpoints = settings.log_checkpoints
        self.name, self.folder, self.space_file, self.params = name, folder, space_file, params
        self.parent_run_id: str | None = None
        self.unlogged: list[str] = []  # what MLflow did not receive, once closed
        self._summary: SearchSummary | None = None

    def __enter__(self) -> SearchRun:
        check_tracking_uri(self.uri, create=False)  # a server that is down stops us before anything starts
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self.parent_run_id is None:  # the search stopped before its first trial: nothing was logged
            return
        interrupted = exc_type is KeyboardInterrupt or (self._summary is not None and self._summary.interrupted)
        status = "KILLED" if interrupted else "FAILED" if exc_type is not None else "FINISHED"
        parent = self.parent_run_id
        self.logger.submit("closing the parent run", lambda: self.client.set_terminated(parent, status))
        self.unlogged = self.logger.close(timeout_s=300)
        _warn_unlogged(self.unlogged)

    def on_event(self, event: SearchEvent) -> None:
        if isinstance(event, SearchStarted):
            self._open(event.resume)
        elif isinstance(event, TrialStarted):
            params = flatten(event.config.to_dict())
            self.logger.submit(
                f"create the run of trial {event.trial_id}", lambda: self._ensure_child(event.trial_id, params)
            )
        elif isinstance(event, TrialReported):
            batch = _metrics_batch(event.metrics, event.samples_seen)
            self.logger.submit(
                f"metrics of trial {event.trial_id} at {event.samples_seen} samples",
                lambda: self.client.log_batch(self._child(event.trial_id), metrics=batch),
            )
        elif isinstance(event, TrialEnded):
            best = storage.join(event.checkpoint, "best.pt") if self.log_checkpoints and event.checkpoint else None
            self.logger.submit(
                f"final status ({event.outcome.value}) and best checkpoint of trial {event.trial_id}",
                lambda: close_run(self.client, self._child(event.trial_id), event.outcome, event.error, best),
            )
        elif isinstance(event, SearchEnded):
            self._log_outcome(event.summary, event.study)

    def _open(self, resume: bool) -> None:
        """Check the store and open the parent run (the same one when resuming). Synchronous:
        a tracking problem stops the search before anything trains."""
        check_tracking_uri(self.uri)
        self.client = _client(self.uri)
        self.experiment_id = experiment_id_for(self.client, self.experiment_name, self.uri)
        self.state = _read_state(self.folder) if resume else {"trials": {}}
        if self.state.get("parent_run_id"):
            self.client.update_run(self.state["parent_run_id"], status="RUNNING")
        else:
            tags = {"posetune.kind": "search", **posetune_tags()}
            run = self.client.create_run(self.experiment_id, run_name=self.name, tags=tags)
            self.state["parent_run_id"] = run.info.run_id
            log_params(self.client, run.info.run_id, self.params)
            with storage.local_copy(self.space_file) as local:
                self.client.log_artifact(run.info.run_id, str(local), "search_space")
        self.state["experiment_id"] = self.experiment_id
        _write_state(self.folder, self.state)
        self.parent_run_id = self.state["parent_run_id"]
        self.logger = AsyncLogger()
        log.info("MLflow: experiment '%s' at %s, parent run %s", self.experiment_name, self.uri, self.parent_run_id)

    def _child(self, trial_id: str) -> str:
        run_id = self.state["trials"].get(trial_id)
        if run_id is None:
            raise RuntimeError(f"no MLflow run for trial {trial_id} yet")
        return run_id

    def _ensure_child(self, trial_id: str, params: dict[str, Any]) -> None:
        """Exactly one child per trial: reuse the recorded one (a resumed trial continues its
        run), else one found by tag (a crash between creating and recording), else create."""
        run_id = self.state["trials"].get(trial_id) or self._find_child(trial_id)
        if run_id is None:
            tags = {
                "mlflow.parentRunId": self.parent_run_id,
                "posetune.trial_id": trial_id,
                "posetune.status": Outcome.RUNNING.value,
                **posetune_tags(),
            }
            run_id = self.client.create_run(self.experiment_id, run_name=f"trial-{trial_id}", tags=tags).info.run_id
            log_params(self.client, run_id, params)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.state["trials"][trial_id] = run_id
        _write_state(self.folder, self.state)

    def _find_child(self, trial_id: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.posetune.trial_id = '{trial_id}' and tags.mlflow.parentRunId = '{self.parent_run_id}'",
        )
        return runs[0].info.run_id if runs else None

    def _log_outcome(self, summary: SearchSummary, study) -> None:
        """The search's best metrics, counts, results files, plots and best model, on the parent run."""
        self._summary = summary
        client, parent, best = self.client, self.parent_run_id, summary.best
        counts = {
            f"posetune.trials_{outcome.value}": n for outcome, n in summary.counts.items() if outcome.value != "running"
        }
        tags = {**counts, "posetune.best_trial": best.id if best else "none", "posetune.cluster": summary.cluster}

        spent = {f"{name.lower()}_hours": h for name, h in summary.compute.resource_hours.items()}
        if summary.compute.cost is not None:
            spent["cost"] = summary.compute.cost

        def outcome() -> None:
            metrics = _metrics_batch(best.best_metrics, 0) if best else []
            client.log_batch(parent, metrics=metrics + _metrics_batch(spent, 0, spent), tags=_tag_list(tags))
            for name in ("results.json", "summary.txt"):
                with storage.local_copy(storage.join(summary.experiment_dir, name)) as local:
                    client.log_artifact(parent, str(local))

        self.logger.submit("the search's best metrics, results.json and summary", outcome)
        if study is not None:
            self.logger.submit("the study plots", lambda: _log_plots(client, parent, study))
        if best and summary.best_config is not None and summary.best_checkpoint:
            self.logger.submit(
                f"registering the best model as '{self.model_name}'",
                lambda: self._register(summary.best_checkpoint, summary.best_config, best.id, best.best_metrics),
            )

    def _register(self, checkpoint: str, cfg: Config, trial_id: str, metrics: dict[str, float]) -> None:
        version = register_model(self.uri, self.parent_run_id, checkpoint, cfg, self.model_name, metrics)
        log.info("MLflow: registered models:/%s/%s (trial %s)", self.model_name, version, trial_id)


def _read_state(folder: str) -> dict[str, Any]:
    path = storage.join(folder, STATE_FILE)
    return json.loads(storage.read_text(path)) if storage.exists(path) else {"trials": {}}


def _write_state(folder: str, state: dict[str, Any]) -> None:
    storage.write_text(storage.join(folder, STATE_FILE), json.dumps(state, indent=2) + "\n")


def _log_plots(client, run_id: str, study) -> None:
    from posetune.tracking.plots import study_plots

    with tempfile.TemporaryDirectory() as folder:
        for problem in study_plots(study, Path(folder)):
            log.info("plot skipped: %s", problem)
        client.log_artifacts(run_id, folder, "plots")


def _warn_unlogged(unlogged: list[str]) -> None:
    if unlogged:
        log.warning(
            "MLflow: %d item(s) could not be logged:\n%s", len(unlogged), "\n".join(f"  - {u}" for u in unlogged)
        )


def close_run(client, run_id: str, outcome: Outcome, error: str | None, best_checkpoint: str | None) -> None:
    """A trial's or a training run's end: its outcome (and error) as tags, its best checkpoint
    (a local path or gs://) as an artifact, and MLflow's run state."""
    client.set_tag(run_id, "posetune.status", outcome.value)
    if error:
        client.set_tag(run_id, "posetune.error", error[:5000])
    if best_checkpoint is not None:  # one that cannot be read is reported as not logged
        with storage.local_copy(best_checkpoint) as local:
            client.log_artifact(run_id, str(local), "checkpoints")
    client.set_terminated(run_id, outcome.run_status)


def _tag_list(tags: dict[str, Any]):
    from mlflow.entities import RunTag

    return [RunTag(key, str(value)) for key, value in tags.items()]


# --- The model registry -----------------------------------------------------------------------


def register_model(uri: str, run_id: str, checkpoint: str, cfg: Config, name: str, metrics: dict) -> str:
    """Log the checkpoint's model as an MLflow PyTorch model in `run_id` and register it.
    The resolved config travels on the model (``posetune_config``) and as config.yaml."""
    import mlflow
    import mlflow.pytorch

    from posetune.train.inference import model_from_checkpoint

    model, _ = model_from_checkpoint(checkpoint)
    model.posetune_config = cfg.to_dict()
    # Pickle, not MLflow 3's torch.export default (which needs an input example); MLflow warns
    # that pickles run code when loaded, which is how every full PyTorch model loads.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with tempfile.TemporaryDirectory() as folder:
        config_file = Path(folder, "config.yaml")
        config_file.write_text(cfg.to_yaml())
        with mlflow.start_run(run_id=run_id):  # the fluent API, in this (driver) process only
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                registered_model_name=name,
                extra_files=[str(config_file)],
                pip_requirements=["posetune", "torch", "torchvision"],  # skip slow inference
                serialization_format="pickle",  # the default, torch.export, needs an input example
            )
    version = str(info.registered_model_version)
    client = _client(uri)
    for key, value in metrics.items():
        if key in REPORTED and isinstance(value, (int, float)):
            client.set_model_version_tag(name, version, key, str(value))
    client.update_model_version(name, version, description="posetune pose model; metrics in the version tags")
    return version


def load_registered_model(model_uri: str, tracking_uri: str | None = None):
    """(model, Config) from e.g. models:/NAME/latest."""
    import mlflow
    import mlflow.pytorch

    from posetune.config import config_from_dict

    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    except Exception as exc:  # unknown name/version, unreachable store
        raise PosetuneError(f"cannot load {model_uri} from {uri}: {str(exc).splitlines()[0]}") from None
    config = getattr(model, "posetune_config", None)
    if config is None:
        raise PosetuneError(f"{model_uri} is not a posetune model (it carries no posetune_config)")
    return model.eval(), config_from_dict(config)


# --- One training run -------------------------------------------------------------------------


class TrainRun:
    """`posetune train` as one MLflow run: params, metrics at every evaluation (step = samples
    seen), the best checkpoint and the final status. As a context manager it closes the run:
    FINISHED, FAILED (an error, a divergence) or KILLED (Ctrl-C). A user error before the first
    evaluation (a bad dataset path) logs nothing and creates no store."""

    def __init__(self, cfg: Config, out_dir: Path):
        self.cfg, self.out_dir = cfg, out_dir
        self.uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
        self.experiment_name = cfg.tracking.experiment_name or "posetune"
        self.run_id: str | None = None
        self.evaluated = False
        self.unlogged: list[str] = []

    def __enter__(self) -> TrainRun:
        check_tracking_uri(self.uri, create=False)  # an embedded store is made by the first evaluation
        self.logger = AsyncLogger()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        outcome = _train_outcome(exc)
        trained = self.evaluated or outcome is Outcome.DIVERGED or not isinstance(exc, PosetuneError)
        if trained:
            error = None if exc is None else str(exc) or type(exc).__name__
            self.logger.submit("final status, config, metrics and best checkpoint", lambda: self._close(outcome, error))
        name = self.cfg.tracking.registered_model_name
        if name and outcome is Outcome.COMPLETED:
            best = json.loads((self.out_dir / "metrics.json").read_text())["best"]
            checkpoint = str(self.out_dir / "checkpoints" / "best.pt")
            self.logger.submit(
                f"registering the model as '{name}'",
                lambda: register_model(self.uri, self.run_id, checkpoint, self.cfg, name, best),
            )
        self.unlogged = self.logger.close(timeout_s=300)
        _warn_unlogged(self.unlogged)

    def on_evaluation(self, evaluation) -> None:
        self.evaluated = True
        metrics = {
            **evaluation.metrics,
            "train_loss": evaluation.train_loss,
            "train_images_per_s": evaluation.train_images_per_s,
        }
        batch = _metrics_batch(metrics, evaluation.samples_seen)

        def apply() -> None:
            self._open_run()
            self.client.log_batch(self.run_id, metrics=batch)

        self.logger.submit(f"metrics at {evaluation.samples_seen} samples", apply)

    def _open_run(self) -> None:
        if self.run_id is not None:
            return
        check_tracking_uri(self.uri)
        self.client = _client(self.uri)  # opening a SQLite store creates it
        experiment_id = experiment_id_for(self.client, self.experiment_name, self.uri)
        tags = {"posetune.kind": "train", "posetune.status": Outcome.RUNNING.value, **posetune_tags()}
        self.run_id = self.client.create_run(experiment_id, run_name=self.out_dir.name, tags=tags).info.run_id
        log_params(self.client, self.run_id, flatten(self.cfg.to_dict()))
        log.info("MLflow: run %s in experiment '%s' at %s", self.run_id, self.experiment_name, self.uri)

    def _close(self, outcome: Outcome, error: str | None) -> None:
        self._open_run()
        for name in ("config.yaml", "metrics.json"):
            if (self.out_dir / name).exists():
                self.client.log_artifact(self.run_id, str(self.out_dir / name))
        best_file = self.out_dir / "checkpoints" / "best.pt"  # none when training stopped before an evaluation
        best = str(best_file) if self.cfg.tracking.log_checkpoints and best_file.exists() else None
        close_run(self.client, self.run_id, outcome, error, best)


def _train_outcome(exc: BaseException | None) -> Outcome:
    if exc is None:
        return Outcome.COMPLETED
    if isinstance(exc, TrainingDiverged):
        return Outcome.DIVERGED
    return Outcome.INTERRUPTED if isinstance(exc, KeyboardInterrupt) else Outcome.FAILED


# --- posetune ui ------------------------------------------------------------------------------


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
    client = _client(uri)
    return [
        (e.name, f"http://127.0.0.1:{port}/#/experiments/{e.experiment_id}/runs")
        for e in client.search_experiments()
        if e.name != "Default"
    ]
