"""MLflow runs: a parent run per search with one nested child run per trial (``SearchRun``, a
listener of the search's events in search.events), and one run per `posetune train`
(``TrainRun``). Both are context managers: a run closes itself as FINISHED, FAILED or KILLED.
``open_search_run`` is the one way in for a search, from the CLI or from Python. Nothing here
imports Ray, the search's run or the trials.

Everything is logged from the driver process: Tune already receives rank 0's metrics, so
there is exactly one writer and no MLflow state in training workers. Calls go through
tracking.store's ``AsyncLogger``: training never waits on tracking. Run ids live on disk
(``tracking.json`` in the experiment folder), so a resumed search continues the same parent
and child runs instead of creating duplicates.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from posetune import storage
from posetune.config import Config, TrackingConfig, flatten
from posetune.errors import PosetuneError, TrainingDiverged
from posetune.search.events import (
    REPORTED,
    Outcome,
    SearchEnded,
    SearchEvent,
    SearchStarted,
    TrialEnded,
    TrialReported,
    TrialStarted,
)
from posetune.search.results import SearchSummary, TrialRecord, experiment_dir, summary_lines
from posetune.search.space import SearchSpace, describe_parameter
from posetune.tracking.registry import register_model
from posetune.tracking.store import (
    AsyncLogger,
    check_tracking_uri,
    experiment_id_for,
    mlflow_client,
    resolve_tracking_uri,
    server_probe,
)

log = logging.getLogger(__name__)

STATE_FILE = "tracking.json"


# --- What a run logs ---------------------------------------------------------------------------


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

    def __init__(
        self,
        settings: TrackingConfig,
        name: str,
        folder: str,
        space_file: str | None,
        params: dict[str, Any],
        space: SearchSpace | None = None,  # logged as YAML when there is no space_file
    ):
        self.uri = resolve_tracking_uri(settings.tracking_uri)
        self.experiment_name = settings.experiment_name or name
        self.model_name = settings.registered_model_name or f"posetune-{name}"
        self.log_checkpoints = settings.log_checkpoints
        self.name, self.folder, self.space_file, self.params = name, folder, space_file, params
        self.space = space
        self.parent_run_id: str | None = None
        self.unlogged: list[str] = []  # what MLflow did not receive, once closed
        self.recreated: list[str] = []  # runs re-created because the store had lost them (a resume)
        self._summary: SearchSummary | None = None
        # Steps each running trial's run holds, per metric (loaded from the store for a run made
        # before this process), so that a re-reported evaluation is not logged twice.
        self._logged: dict[str, dict[str, set[int]]] = {}
        self._new_runs: set[str] = set()  # trials whose run this process created: it held nothing

    def __enter__(self) -> SearchRun:
        check_tracking_uri(self.uri, create=False)  # a server that is down stops us before anything starts
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self.parent_run_id is None:  # the search stopped before its first trial: nothing was logged
            return
        interrupted = exc_type is KeyboardInterrupt or (self._summary is not None and self._summary.interrupted)
        status = "KILLED" if interrupted else "FAILED" if exc_type is not None else "FINISHED"
        parent = self.parent_run_id
        self.logger.submit("the parent run's final status", lambda: self.client.set_terminated(parent, status))
        self.unlogged = self.logger.close(timeout_s=300)
        _warn_unlogged(self.unlogged)
        if self.unlogged and self._summary is not None:
            self._add_to_summary(self._summary, self.unlogged)

    def _add_to_summary(self, summary: SearchSummary, unlogged: list[str]) -> None:
        """What MLflow did not receive is an error of the search: in its summary (summary.txt,
        the table the CLI prints, exit code 1), not only a warning on stderr. The copy of
        summary.txt on the parent run was logged before the end and cannot say it."""
        summary.problems.extend(f"MLflow did not receive {item}" for item in unlogged)
        try:
            text = "\n".join(summary_lines(summary)) + "\n"
            storage.write_text(storage.join(summary.experiment_dir, "summary.txt"), text)
        except PosetuneError as exc:  # the summary the caller prints still lists them
            log.warning("could not add MLflow's problems to summary.txt: %s", exc)

    def on_event(self, event: SearchEvent) -> None:
        if isinstance(event, SearchStarted):
            self._open(event.resume)
        elif isinstance(event, TrialStarted):
            params = flatten(event.config.to_dict())
            self.logger.submit(f"the run of trial {event.trial_id}", lambda: self._ensure_child(event.trial_id, params))
        elif isinstance(event, TrialReported):
            batch = _metrics_batch(event.metrics, event.samples_seen)
            self.logger.submit(
                f"the metrics of trial {event.trial_id} at {event.samples_seen} samples",
                lambda: self._log_points(event.trial_id, batch),
            )
        elif isinstance(event, TrialEnded):
            best = self._best_checkpoint(event.checkpoint)
            if best is not None:  # its own call: a checkpoint that cannot be logged still lets the run end
                self.logger.submit(
                    f"the best checkpoint of trial {event.trial_id}",
                    lambda: log_checkpoint(self.client, self._child(event.trial_id), best),
                )
            self.logger.submit(
                f"the final status ({event.outcome.value}) of trial {event.trial_id}",
                lambda: self._end_child(event.trial_id, event.outcome, event.error, None),
            )
        elif isinstance(event, SearchEnded):
            self._log_outcome(event.summary, event.study)

    def _open(self, resume: bool) -> None:
        """Check the store and open the parent run (the same one when resuming). Synchronous:
        a tracking problem stops the search before anything trains."""
        check_tracking_uri(self.uri)
        self.client = mlflow_client(self.uri)
        self.experiment_id = experiment_id_for(self.client, self.experiment_name, self.uri)
        self.state = _read_state(self.folder) if resume else {"trials": {}}
        lost = self.state.get("parent_run_id") and not self._exists(self.state["parent_run_id"])
        if lost:  # e.g. the head and its MLflow store are gone; the experiment is in the bucket
            log.warning(
                "MLflow: %s has no run %s, this search's parent run (the store was lost or replaced): "
                "logging to a new parent run, with a child run for every trial again",
                self.uri,
                self.state["parent_run_id"],
            )
            self.state = {"trials": {}}
        if self.state.get("parent_run_id"):
            self.client.update_run(self.state["parent_run_id"], status="RUNNING")
        else:
            tags = {"posetune.kind": "search", **posetune_tags()}
            run = self.client.create_run(self.experiment_id, run_name=self.name, tags=tags)
            self.state["parent_run_id"] = run.info.run_id
            log_params(self.client, run.info.run_id, self.params)
            self._log_space(run.info.run_id)
        self.state["experiment_id"] = self.experiment_id
        _write_state(self.folder, self.state)
        self.parent_run_id = self.state["parent_run_id"]
        if lost:
            self.recreated.append(f"parent run {self.parent_run_id}")
        self.logger = AsyncLogger(server_answers=server_probe(self.uri))
        log.info("MLflow: experiment '%s' at %s, parent run %s", self.experiment_name, self.uri, self.parent_run_id)

    def _log_space(self, run_id: str) -> None:
        """The search-space file; a space made in Python (no file) as the YAML it validated to."""
        if self.space_file is not None:
            with storage.local_copy(self.space_file) as local:
                self.client.log_artifact(run_id, str(local), "search_space")
            return
        import yaml

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder, f"{self.name}.yaml")
            path.write_text(yaml.safe_dump(self.space.model_dump(mode="json"), sort_keys=False))
            self.client.log_artifact(run_id, str(path), "search_space")

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def _recreate_ended_trials(self, summary: SearchSummary) -> None:
        """Child runs for ended trials that have none in this store: those that had ended before a
        resume whose store had lost them (they send no events), also when that resume itself was
        interrupted before its end. Made again from results.json: the searched params, the metrics
        at the last and best evaluations, status, best checkpoint. Decided on the logger's thread,
        after every queued call, so a child still being created is never made twice."""
        ended = [record for record in summary.records if record.status != Outcome.RUNNING]
        for record in ended:
            self.logger.submit(f"the re-created run of trial {record.id}", lambda r=record: self._recreate(r))
        if ended:
            self.logger.submit("the final status of trials that had ended", lambda: self._end_stale_children(ended))

    def _recreate(self, record: TrialRecord) -> None:
        if record.id in self.state["trials"] or self._find_child(record.id):
            return
        self.recreated.append(f"trial {record.id}")
        self._ensure_child(record.id, record.params)
        self._log_points(record.id, _record_points(record))
        self._end_child(record.id, record.status, record.error, self._best_checkpoint(record.checkpoint))

    def _end_stale_children(self, ended: list[TrialRecord]) -> None:
        """End the child runs still RUNNING whose trial has ended: a driver killed while their
        close was queued leaves them so, and a resumed search sends no event for a trial that
        had ended. Ended from results.json (its last and best evaluations, status, best
        checkpoint), as a lost run is re-created. Runs on the logger's thread after every
        queued call: the trials that ended in this process are closed by then."""
        records = {record.id: record for record in ended}
        for run in self._running_children():
            record = records.get(run.data.tags.get("posetune.trial_id", ""))
            if record is None:
                continue
            if self.state["trials"].get(record.id) != run.info.run_id:  # a kill between creating and recording
                self.state["trials"][record.id] = run.info.run_id
                _write_state(self.folder, self.state)
            log.info("MLflow: ending the run of trial %s, which had ended (%s)", record.id, record.status.value)
            self._log_points(record.id, _record_points(record))
            self._end_child(record.id, record.status, record.error, self._best_checkpoint(record.checkpoint))

    def _running_children(self) -> list:
        filter_string = f"tags.mlflow.parentRunId = '{self.parent_run_id}' and attributes.status = 'RUNNING'"
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string, max_results=1000, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def _log_points(self, trial_id: str, batch: list) -> None:
        """Log the points of `batch` that the trial's run does not hold yet: a trial restored from
        its last checkpoint after a kill may report that evaluation again, and an ended run made
        whole from results.json holds most of its points already."""
        run_id = self._child(trial_id)
        logged = self._logged.setdefault(trial_id, {})
        for key in {point.key for point in batch} - logged.keys():
            history = [] if trial_id in self._new_runs else self.client.get_metric_history(run_id, key)
            logged[key] = {point.step for point in history}
        fresh = [point for point in batch if point.step not in logged[point.key]]
        if fresh:
            self.client.log_batch(run_id, metrics=fresh)
        for point in fresh:
            logged[point.key].add(point.step)

    def _end_child(self, trial_id: str, outcome: Outcome, error: str | None, checkpoint: str | None) -> None:
        close_run(self.client, self._child(trial_id), outcome, error, checkpoint)
        self._logged.pop(trial_id, None)  # a trial run again (--retry-failed) reads its run's steps again
        self._new_runs.discard(trial_id)

    def _best_checkpoint(self, checkpoint: str | None) -> str | None:
        """A trial's best.pt to log as an artifact, or None (none, or not asked for)."""
        return storage.join(checkpoint, "best.pt") if self.log_checkpoints and checkpoint else None

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
            self._new_runs.add(trial_id)
        else:
            self.client.update_run(run_id, status="RUNNING")
            self._logged.pop(trial_id, None)  # its steps are read from the store when it reports
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
        self._recreate_ended_trials(summary)
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
                f"the best model, registered as '{self.model_name}'",
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


def run_status(outcome: Outcome) -> str:
    """MLflow's run status for a trial's or a training run's outcome."""
    if outcome in (Outcome.FAILED, Outcome.DIVERGED):
        return "FAILED"
    return {Outcome.RUNNING: "RUNNING", Outcome.INTERRUPTED: "KILLED"}.get(outcome, "FINISHED")


def close_run(client, run_id: str, outcome: Outcome, error: str | None, best_checkpoint: str | None) -> None:
    """A trial's or a training run's end: its outcome (and error) as tags, its best checkpoint
    (a local path or gs://) as an artifact, and MLflow's run state. The run ends also when the
    checkpoint cannot be logged (the error is raised, and reported): a run left RUNNING would
    look alive for ever."""
    client.set_tag(run_id, "posetune.status", outcome.value)
    if error:
        client.set_tag(run_id, "posetune.error", error[:5000])
    try:
        if best_checkpoint is not None:
            log_checkpoint(client, run_id, best_checkpoint)
    finally:
        client.set_terminated(run_id, run_status(outcome))


def log_checkpoint(client, run_id: str, checkpoint: str) -> None:
    """A checkpoint (a local path or gs://) as the run's ``checkpoints/<name>``, weights only.
    One that cannot be read is a CheckpointError: reported as not logged, never retried."""
    from posetune.train.checkpoint import load_checkpoint, save_checkpoint, weights_only

    state = load_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, posixpath.basename(str(checkpoint).rstrip("/")))
        save_checkpoint(weights_only(state), path)  # a best.pt from before they were weights only
        del state
        client.log_artifact(run_id, str(path), "checkpoints")


def _record_points(record: TrialRecord) -> list:
    """A trial's metrics as results.json has them: at its last and at its best evaluation."""
    best_step = int(record.best_metrics.get("samples_seen", record.samples_seen))
    points = _metrics_batch(record.metrics, record.samples_seen)
    if best_step != record.samples_seen:
        points += _metrics_batch(record.best_metrics, best_step)
    return points


def _tag_list(tags: dict[str, Any]):
    from mlflow.entities import RunTag

    return [RunTag(key, str(value)) for key, value in tags.items()]


# --- The way in for a search -----------------------------------------------------------------


def space_params(space: SearchSpace) -> dict[str, Any]:
    """The search's own settings, flattened (a search's MLflow parent-run params)."""
    params = {f"space.{key}": describe_parameter(p) for key, p in space.parameters.items()}
    for section in ("search", "resources"):
        for key, value in getattr(space, section).model_dump(mode="json").items():
            if key != "points_to_evaluate":
                params[f"{section}.{key}"] = json.dumps(value) if isinstance(value, dict) else value
    params["search.points_to_evaluate"] = len(space.search.points_to_evaluate)
    params["base.config"] = space.base.config
    return params


class SearchTracking(Protocol):
    """What ``open_search_run`` returns: a listener of the search's events that, as a context
    manager, closes what it opened. ``uri`` is None when nothing is tracked; ``unlogged`` lists
    what MLflow did not receive, once closed (a ``SearchRun`` also adds them to the search's
    summary: its problems and summary.txt); ``recreated`` the runs made again because the
    store had lost them (a resume after the head and its store were gone)."""

    uri: str | None
    unlogged: list[str]
    recreated: list[str]

    def __enter__(self) -> SearchTracking: ...
    def __exit__(self, exc_type, exc, traceback) -> None: ...
    def on_event(self, event: SearchEvent) -> None: ...


class NoTracking:
    """The listener of a search with ``tracking.enabled: false``: it logs nothing."""

    uri: str | None = None

    def __init__(self) -> None:
        self.unlogged: list[str] = []
        self.recreated: list[str] = []

    def __enter__(self) -> NoTracking:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        return None

    def on_event(self, event: SearchEvent) -> None:
        return None


def open_search_run(space: SearchSpace, space_file: str | Path | None = None) -> SearchTracking:
    """The parent run of a search over `space`, as a context manager and a listener:

        with open_search_run(space, path) as run:
            summary = run_search(space, base, listeners=[run])

    A ``SearchRun`` (its parent run is opened by the search's first event, closed by the
    ``with``), or a ``NoTracking`` when the space sets ``tracking.enabled: false``. `space_file`
    is logged on the parent run; without one, the validated space is logged as YAML."""
    if not space.tracking.enabled:
        return NoTracking()
    file = None if space_file is None else str(space_file)
    name, folder = space.storage.name, experiment_dir(space)
    return SearchRun(space.tracking, name, folder, file, space_params(space), space)


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
        self.logger = AsyncLogger(server_answers=server_probe(self.uri))
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        outcome = _train_outcome(exc)
        trained = self.evaluated or outcome is Outcome.DIVERGED or not isinstance(exc, PosetuneError)
        if trained:
            error = None if exc is None else str(exc) or type(exc).__name__
            what = "the final status, config, metrics and best checkpoint"
            self.logger.submit(what, lambda: self._close(outcome, error))
        name = self.cfg.tracking.registered_model_name
        if name and outcome is Outcome.COMPLETED:
            best = json.loads((self.out_dir / "metrics.json").read_text())["best"]
            checkpoint = str(self.out_dir / "checkpoints" / "best.pt")
            self.logger.submit(
                f"the model, registered as '{name}'",
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

        self.logger.submit(f"the metrics at {evaluation.samples_seen} samples", apply)

    def _open_run(self) -> None:
        if self.run_id is not None:
            return
        check_tracking_uri(self.uri)
        self.client = mlflow_client(self.uri)  # opening a SQLite store creates it
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
