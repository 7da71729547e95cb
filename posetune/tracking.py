"""MLflow tracking: a parent run per search with one nested child run per trial, and one run
per `posetune train`.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from posetune import storage
from posetune.config import Config, TrackingConfig, flatten
from posetune.errors import PosetuneError
from posetune.metrics import METRIC_NAMES
from posetune.search import first_error_line, print_line, trial_status
from posetune.trial import TrialSetup, build_trial_config

log = logging.getLogger(__name__)

PROJECT_RUNS = Path("runs")  # the project's run folder, relative to the working directory
STATE_FILE = "tracking.json"
LOGGED_METRICS = (*METRIC_NAMES, "train_loss", "train_images_per_s")


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

    def __init__(self, say: Callable[[str], None] = print_line, max_backoff_s: float = 15.0):
        self._queue: queue.Queue = queue.Queue()
        self._say, self._max_backoff = say, max_backoff_s
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
                    self._say(f"MLflow: could not log {what}: {str(exc).splitlines()[0][:200]}")
                    return
                if self._closing.is_set():
                    self.failed.append(f"{what} (gave up: {str(exc).splitlines()[0][:120]})")
                    return
                if not down:
                    down = True
                    self.outages += 1
                    self._say(f"MLflow unavailable ({str(exc).splitlines()[0][:100]}); retrying in the background")
                time.sleep(backoff)
                backoff = min(self._max_backoff, backoff * 2)
                continue
            if down:
                self._say("MLflow reachable again; catching up")
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


def _metrics_batch(metrics: dict[str, Any], step: int):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [
        Metric(key, float(value), now, step)
        for key, value in metrics.items()
        if key in LOGGED_METRICS and isinstance(value, (int, float)) and math.isfinite(value)
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


@dataclass
class SearchTracking:
    """Everything the trial callback needs (pickled by Tune with the experiment)."""

    uri: str
    experiment_id: str
    parent_run_id: str
    folder: str  # the experiment folder holding tracking.json
    budget: int
    log_checkpoints: bool


def _read_state(folder: str) -> dict[str, Any]:
    path = storage.join(folder, STATE_FILE)
    return json.loads(storage.read_text(path)) if storage.exists(path) else {"trials": {}, "unlogged": []}


def _write_state(folder: str, state: dict[str, Any]) -> None:
    storage.write_text(storage.join(folder, STATE_FILE), json.dumps(state, indent=2) + "\n")


class TrackingCallback(tune.Callback):
    """Logs each trial to its own child run of the search's parent run."""

    def __init__(
        self,
        settings: SearchTracking,
        trial_params: Callable[[dict[str, Any]], dict[str, Any]],
        say: Callable[[str], None] = print_line,
    ):
        self.settings, self.trial_params, self.say = settings, trial_params, say
        self._logger: AsyncLogger | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_logger": None}  # the thread and client are per process

    @property
    def logger(self) -> AsyncLogger:
        if self._logger is None:
            self._logger = AsyncLogger(self.say)
            self._client = _client(self.settings.uri)
            self._lock = threading.Lock()
        return self._logger

    def _run_id(self, trial_id: str) -> str | None:
        return _read_state(self.settings.folder)["trials"].get(trial_id)

    def on_trial_start(self, iteration, trials, trial, **info):
        params = dict(trial.config)
        self.logger.submit(
            f"create the run of trial {trial.trial_id}", lambda: self._ensure_child(trial.trial_id, params)
        )

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("diverged"):
            return
        batch = _metrics_batch(result, int(result["samples_seen"]))
        self.logger.submit(
            f"metrics of trial {trial.trial_id} at {result['samples_seen']} samples",
            lambda: self._client.log_batch(self._require(trial.trial_id), metrics=batch),
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        status = trial_status(result, self.settings.budget)
        self._finish(trial.trial_id, status, result.get("error"), result.get("checkpoint_path"))

    def on_trial_error(self, iteration, trials, trial, **info):
        checkpoint = (trial.last_result or {}).get("checkpoint_path")
        self._finish(trial.trial_id, "failed", first_error_line(trial), checkpoint)

    def on_experiment_end(self, trials, **info):
        unlogged = self.logger.close(timeout_s=120)
        state = _read_state(self.settings.folder)
        state["unlogged"] = unlogged
        _write_state(self.settings.folder, state)

    def _finish(self, trial_id: str, status: str, error: str | None, checkpoint: str | None) -> None:
        best = None
        if self.settings.log_checkpoints and checkpoint:  # Ray's path (bucket-relative on gs://) as a URI
            best = storage.join(storage.from_ray_path(self.settings.folder, checkpoint), "best.pt")
        self.logger.submit(
            f"final status ({status}) and best checkpoint of trial {trial_id}",
            lambda: close_run(self._client, self._require(trial_id), status, error, best),
        )

    def _require(self, trial_id: str) -> str:
        run_id = self._run_id(trial_id)
        if run_id is None:
            raise RuntimeError(f"no MLflow run for trial {trial_id} yet")
        return run_id

    def _ensure_child(self, trial_id: str, params: dict[str, Any]) -> None:
        """Exactly one child per trial: reuse the recorded one (a resumed trial continues its
        run), else one found by tag (a crash between creating and recording), else create."""
        with self._lock:
            folder = self.settings.folder
            run_id = self._run_id(trial_id) or self._find_child(trial_id)
            if run_id is None:
                run = self._client.create_run(
                    self.settings.experiment_id,
                    run_name=f"trial-{trial_id}",
                    tags={
                        "mlflow.parentRunId": self.settings.parent_run_id,
                        "posetune.trial_id": trial_id,
                        "posetune.status": "running",
                        **posetune_tags(),
                    },
                )
                run_id = run.info.run_id
                log_params(self._client, run_id, self.trial_params(params))
            else:
                self._client.update_run(run_id, status="RUNNING")
            state = _read_state(folder)
            state["trials"][trial_id] = run_id
            _write_state(folder, state)

    def _find_child(self, trial_id: str) -> str | None:
        runs = self._client.search_runs(
            [self.settings.experiment_id],
            filter_string=f"tags.posetune.trial_id = '{trial_id}' and tags.mlflow.parentRunId = "
            f"'{self.settings.parent_run_id}'",
        )
        return runs[0].info.run_id if runs else None


class ResolvedParams:
    """Sampled parameters -> the trial's full config, flattened (its MLflow params).
    A class so that Tune can pickle it with the callback."""

    def __init__(self, setup: TrialSetup):
        self.setup = setup

    def __call__(self, params: dict[str, Any]) -> dict[str, Any]:
        return flatten(build_trial_config(self.setup, params).to_dict())


class SearchTracker:
    """The driver's side: opens (or re-opens) the parent run, hands Tune the trial callback,
    and at the end logs the search's results, plots and best model to the parent run."""

    def __init__(self, settings: TrackingConfig, name: str, folder: str, say: Callable[[str], None] = print_line):
        self.config, self.name, self.folder, self.say = settings, name, folder, say
        self.uri = resolve_tracking_uri(settings.tracking_uri)
        self.experiment_name = settings.experiment_name or name
        self.model_name = settings.registered_model_name or f"posetune-{name}"

    def start(self, space_file: str, params: dict[str, Any], resume: bool) -> None:
        """Check the store and open the parent run (the same one when resuming). Synchronous:
        a tracking problem stops the search before anything trains."""
        check_tracking_uri(self.uri)
        client = _client(self.uri)
        experiment_id = experiment_id_for(client, self.experiment_name, self.uri)
        state = _read_state(self.folder) if resume else {"trials": {}, "unlogged": []}
        if state.get("parent_run_id"):
            client.update_run(state["parent_run_id"], status="RUNNING")
        else:
            run = client.create_run(
                experiment_id, run_name=self.name, tags={"posetune.kind": "search", **posetune_tags()}
            )
            state["parent_run_id"] = run.info.run_id
            log_params(client, run.info.run_id, params)
            with storage.local_copy(space_file) as local:
                client.log_artifact(run.info.run_id, str(local), "search_space")
        state["experiment_id"] = experiment_id
        _write_state(self.folder, state)
        self.say(f"MLflow: experiment '{self.experiment_name}' at {self.uri}, parent run {state['parent_run_id']}")
        self.experiment_id, self.parent_run_id = experiment_id, state["parent_run_id"]

    def callbacks(self, setup: TrialSetup) -> list[tune.Callback]:
        """The Tune callback that logs trials (for run_search's extra_callbacks)."""
        settings = SearchTracking(
            self.uri,
            self.experiment_id,
            self.parent_run_id,
            str(self.folder),
            setup.space.search.asha.max_samples,
            self.config.log_checkpoints,
        )
        return [TrackingCallback(settings, ResolvedParams(setup), self.say)]

    def finish(self, summary, study, best_config: Config | None) -> list[str]:
        """Log the search's outcome to the parent run; return what could not be logged."""
        state = _read_state(self.folder)
        unlogged = list(state.get("unlogged", []))
        logger = AsyncLogger(self.say)
        client = _client(self.uri)
        parent = state["parent_run_id"]
        best = summary.records[0] if summary.records and summary.records[0].get("best_metrics") else None

        def outcome() -> None:
            c = summary.counts
            client.log_batch(
                parent,
                metrics=_metrics_batch(best["best_metrics"], 0) if best else [],
                tags=_tag_list(
                    {
                        "posetune.trials_completed": c["completed"],
                        "posetune.trials_stopped_early": c["stopped_early"],
                        "posetune.trials_failed": c["failed"],
                        "posetune.trials_diverged": c["diverged"],
                        "posetune.best_trial": best["id"] if best else "none",
                        "posetune.cluster": summary.cluster,
                    }
                ),
            )
            for name in ("results.json", "summary.txt"):
                with storage.local_copy(storage.join(summary.experiment_dir, name)) as local:
                    client.log_artifact(parent, str(local))

        logger.submit("the search's best metrics, results.json and summary", outcome)
        if study is not None:
            logger.submit("the study plots", lambda: self._log_plots(client, parent, study))
        if best_config is not None and summary.best_checkpoint:
            logger.submit(
                f"registering the best model as '{self.model_name}'",
                lambda: self._register(parent, summary.best_checkpoint, best_config, best),
            )
        status = "KILLED" if summary.interrupted else "FINISHED"
        logger.submit("closing the parent run", lambda: client.set_terminated(parent, status))
        unlogged += logger.close(timeout_s=300)
        return unlogged

    def _log_plots(self, client, run_id: str, study) -> None:
        from posetune.plots import study_plots

        with tempfile.TemporaryDirectory() as folder:
            for problem in study_plots(study, Path(folder)):
                self.say(f"plot skipped: {problem}")
            client.log_artifacts(run_id, folder, "plots")

    def _register(self, run_id: str, checkpoint: str, cfg: Config, best: dict) -> None:
        version = register_model(self.uri, run_id, checkpoint, cfg, self.model_name, best["best_metrics"])
        self.say(f"MLflow: registered models:/{self.model_name}/{version} (trial {best['id']})")


def close_run(client, run_id: str, status: str, error: str | None, best_checkpoint: str | None) -> None:
    """A trial's or a training run's end: its posetune status (and error) as tags, its best
    checkpoint (a local path or gs://) as an artifact, and MLflow's run state."""
    client.set_tag(run_id, "posetune.status", status)
    if error:
        client.set_tag(run_id, "posetune.error", error[:5000])
    if best_checkpoint is not None:  # one that cannot be read is reported as not logged
        with storage.local_copy(best_checkpoint) as local:
            client.log_artifact(run_id, str(local), "checkpoints")
    client.set_terminated(run_id, "FAILED" if status in ("failed", "diverged") else "FINISHED")


def _tag_list(tags: dict[str, Any]):
    from mlflow.entities import RunTag

    return [RunTag(key, str(value)) for key, value in tags.items()]


# --- The model registry -----------------------------------------------------------------------


def register_model(uri: str, run_id: str, checkpoint: str, cfg: Config, name: str, metrics: dict) -> str:
    """Log the checkpoint's model as an MLflow PyTorch model in `run_id` and register it.
    The resolved config travels on the model (``posetune_config``) and as config.yaml."""
    import mlflow
    import mlflow.pytorch

    from posetune.inference import model_from_checkpoint

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
        if key in LOGGED_METRICS and isinstance(value, (int, float)):
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


class TrainTracker:
    """`posetune train` as one MLflow run: params, metrics at every evaluation (step = samples
    seen), the best checkpoint and the final status."""

    def __init__(self, cfg: Config, say: Callable[[str], None] = print_line):
        self.cfg, self.say = cfg, say
        self.uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
        self.experiment_name = cfg.tracking.experiment_name or "posetune"
        self.logger: AsyncLogger | None = None

    def start(self, out_dir: Path) -> None:
        """Check the store now (a problem stops us before training); the run itself is opened
        by the first evaluation, so a run that never trains (a bad dataset path) logs nothing."""
        check_tracking_uri(self.uri, create=False)  # an embedded store is made by the first evaluation
        self.out_dir, self.run_id = out_dir, None
        self.logger = AsyncLogger(self.say)

    def _open_run(self) -> None:
        if self.run_id is not None:
            return
        check_tracking_uri(self.uri)
        self.client = _client(self.uri)  # opening a SQLite store creates it
        self.experiment_id = experiment_id_for(self.client, self.experiment_name, self.uri)
        tags = {"posetune.kind": "train", "posetune.status": "running", **posetune_tags()}
        self.run_id = self.client.create_run(self.experiment_id, run_name=self.out_dir.name, tags=tags).info.run_id
        log_params(self.client, self.run_id, flatten(self.cfg.to_dict()))
        self.say(f"MLflow: run {self.run_id} in experiment '{self.experiment_name}' at {self.uri}")

    def on_evaluation(self, evaluation) -> None:
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

    def finish(self, status: str, error: str | None = None, trained: bool = True) -> list[str]:
        """Close the run. `trained=False` (a user error before training) logs nothing."""
        out_dir = self.out_dir

        best_file = out_dir / "checkpoints" / "best.pt"  # none when training stopped before an evaluation
        best = str(best_file) if self.cfg.tracking.log_checkpoints and best_file.exists() else None

        def apply() -> None:
            self._open_run()
            for name in ("config.yaml", "metrics.json"):
                if (out_dir / name).exists():
                    self.client.log_artifact(self.run_id, str(out_dir / name))
            close_run(self.client, self.run_id, status, error, best)

        if trained or self.run_id is not None:
            self.logger.submit("final status, config, metrics and best checkpoint", apply)
        name = self.cfg.tracking.registered_model_name
        if name and status == "completed":
            best = json.loads((out_dir / "metrics.json").read_text())["best"]
            self.logger.submit(
                f"registering the model as '{name}'",
                lambda: register_model(
                    self.uri, self.run_id, str(out_dir / "checkpoints" / "best.pt"), self.cfg, name, best
                ),
            )
        return self.logger.close(timeout_s=300)


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
