"""A search's results: one typed record per trial, ranking by the one "better" rule,
results.json, the experiment folder and the summary table.

``SearchResults`` here is one listener of the search's events (``search.events``); tracking's
MLflow run is another. Nothing here imports Ray, torch or MLflow.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import cmp_to_key
from typing import TYPE_CHECKING, Any

from posetune import storage
from posetune.choices import METRIC_NAMES, better, diverged_result
from posetune.config import Config
from posetune.errors import PosetuneError

# The events and Outcome lived here before search/events.py. Searches saved by the flat layout
# pickled them as posetune.results.*, which search/legacy.py maps to this module: keep these names.
from posetune.search.events import (  # noqa: F401 - re-exported, see above
    REPORTED,
    Listener,
    Outcome,
    SearchEnded,
    SearchEvent,
    SearchStarted,
    TrialEnded,
    TrialEvent,
    TrialReported,
    TrialStarted,
)
from posetune.tables import format_table

if TYPE_CHECKING:
    from posetune.search.space import SearchSpace

log = logging.getLogger(__name__)

COUNTED = (Outcome.RUNNING, Outcome.COMPLETED, Outcome.STOPPED_EARLY, Outcome.FAILED, Outcome.DIVERGED)


# --- The summary ---------------------------------------------------------------------------------


@dataclass
class SearchSummary:
    experiment_dir: str  # a local folder or a gs:// URI
    records: list[TrialRecord]  # best first, then the ones without results
    counts: dict[Outcome, int]
    seconds: float
    metric: str
    mode: str
    best_config: Config | None  # the best trial's config, ready for `posetune train`
    best_config_file: str | None
    best_checkpoint: str | None
    interrupted: bool
    cluster: str  # resources the search ran with
    compute: Compute
    problems: list[str] = field(default_factory=list)  # exports that could not be made

    @property
    def best(self) -> TrialRecord | None:
        return self.records[0] if self.records and is_best_candidate(self.records[0]) else None


# --- Records ------------------------------------------------------------------------------------


@dataclass
class TrialRecord:
    """One trial as results.json stores it."""

    id: str
    params: dict[str, Any]
    status: Outcome = Outcome.RUNNING
    metrics: dict[str, float] = field(default_factory=dict)  # at the latest evaluation
    samples_seen: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)  # at its best evaluation (+ samples_seen)
    checkpoint: str | None = None
    error: str | None = None
    resource_hours: dict[str, float] = field(default_factory=dict)  # its workers' GPU-/CPU-hours

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status.value}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrialRecord:
        return cls(**{**data, "status": Outcome(data["status"])})


def rank(records: list[TrialRecord], metric: str, mode: str) -> list[TrialRecord]:
    """Best first (by each trial's best evaluation); then diverged trials the same way (a
    config that diverged is never the search's best: its best_config.yaml would reproduce a
    diverging run); trials without a score last, in order."""

    def order(a: TrialRecord, b: TrialRecord) -> int:
        x, y = a.best_metrics[metric], b.best_metrics[metric]
        return -1 if better(x, y, mode) else 1 if better(y, x, mode) else 0

    def scored(diverged: bool) -> list[TrialRecord]:
        group = [r for r in records if metric in r.best_metrics and (r.status is Outcome.DIVERGED) == diverged]
        return sorted(group, key=cmp_to_key(order))

    return scored(False) + scored(True) + [r for r in records if metric not in r.best_metrics]


def is_best_candidate(record: TrialRecord) -> bool:
    """Whether a trial can be the search's best: it has a score and did not diverge."""
    return bool(record.best_metrics) and record.status is not Outcome.DIVERGED


@dataclass(frozen=True)
class Compute:
    """What a search's trial workers held: GPU- and CPU-hours, and their cost when prices are
    known (resources.prices)."""

    resource_hours: dict[str, float]
    cost: float | None

    def to_json(self) -> dict[str, Any]:
        return {"resource_hours": self.resource_hours, "cost": self.cost}

    def describe(self) -> str:
        hours = ", ".join(f"{h:.3g} {name}-hours" for name, h in sorted(self.resource_hours.items(), reverse=True))
        cost = f"; cost {self.cost:.2f} at resources.prices" if self.cost is not None else ""
        return f"{hours or 'nothing'} held by trial workers{cost}"


def compute(records: list[TrialRecord], prices: dict[str, float]) -> Compute:
    hours: dict[str, float] = {}
    for record in records:
        for name, h in record.resource_hours.items():
            hours[name] = hours.get(name, 0.0) + h
    cost = sum(prices.get(name, 0.0) * h for name, h in hours.items()) if prices else None
    return Compute(hours, cost)


def count(records: list[TrialRecord]) -> dict[Outcome, int]:
    counts = dict.fromkeys(COUNTED, 0)
    for record in records:
        counts[record.status] = counts.get(record.status, 0) + 1
    return counts


# --- results.json: a listener -------------------------------------------------------------------


ENDED_WRITE_WAIT_S = 10.0  # how long a trial's end waits for results.json (never for ever)


class LatestWriter:
    """Writes the latest text given to `put` to a file or object, on a thread of its own.

    results.json changes on every trial event, inside Tune's callback: written there, each
    change would be an upload on Tune's loop (bursts meet GCS's one write per second per
    object) and a persistent storage error would abort the search. Here a burst collapses
    into one write of its last state, at most one write per MIN_INTERVAL_S, and a failed
    write is retried (with backoff) with whatever is newest then; `flush` says at the end
    whether the file holds the last state, and why not."""

    MIN_INTERVAL_S = 1.0
    MAX_BACKOFF_S = 30.0

    def __init__(self, uri: str):
        self.uri = uri
        self._pending: str | None = None
        self._error: str | None = None
        self._changed = threading.Condition()
        threading.Thread(target=self._run, name="results-writer", daemon=True).start()

    def put(self, text: str) -> None:
        with self._changed:
            self._pending = text
            self._changed.notify_all()

    def flush(self, timeout: float = 60.0) -> str | None:
        """Wait (up to timeout) until the last text is written; None once it is, else why not."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._pending is not None and time.monotonic() < deadline:
                self._changed.wait(max(0.0, min(1.0, deadline - time.monotonic())))
            if self._pending is None:
                return None
            return self._error or f"{self.uri} was still being written after {timeout:.0f} s"

    def _run(self) -> None:
        backoff = self.MIN_INTERVAL_S
        while True:
            with self._changed:
                while self._pending is None:
                    self._changed.wait()
                text = self._pending
            try:
                storage.write_text(self.uri, text)
            except Exception as exc:  # the writer outlives any storage fault; flush reports it
                if self._error is None:
                    log.warning("could not write %s (retrying; the search goes on): %s", self.uri, exc)
                self._error = str(exc)
                time.sleep(backoff)
                backoff = min(2 * backoff, self.MAX_BACKOFF_S)
                continue
            with self._changed:
                if self._pending is text:
                    self._pending = None
                if self._error is not None:
                    log.info("%s written again", self.uri)
                self._error, backoff = None, self.MIN_INTERVAL_S
                self._changed.notify_all()
            time.sleep(self.MIN_INTERVAL_S)


class SearchResults:
    """Keeps one record per trial, keeps results.json current (atomically, off Tune's loop:
    ``LatestWriter``) and logs one progress line per event."""

    def __init__(self, path: str, metric: str, mode: str, prices: dict[str, float], resume: bool = False):
        self.path, self.metric, self.mode, self.prices = path, metric, mode, prices
        self.start = time.monotonic()
        # A resumed search keeps what it already knew. A new one starts empty, also over the
        # results.json of a search killed before Tune's first snapshot (nothing to resume):
        # its trials, still "running" there, are not this search's.
        self.records: dict[str, TrialRecord] = {}
        if resume and storage.exists(path):
            for data in json.loads(storage.read_text(path))["trials"]:
                self.records[data["id"]] = TrialRecord.from_json(data)
        self.writer = LatestWriter(path)

    def on_event(self, event: SearchEvent) -> None:
        if isinstance(event, (SearchStarted, SearchEnded)):
            return
        record = self.records.setdefault(event.trial_id, TrialRecord(event.trial_id, event.params))
        if isinstance(event, TrialStarted):
            record.status = Outcome.RUNNING
            line = f"started  {format_params(event.params)}"
        elif isinstance(event, TrialReported):
            line = self._reported(record, event)
        else:
            record.status, record.samples_seen = event.outcome, max(record.samples_seen, event.samples_seen)
            for name, hours in event.resource_hours.items():
                record.resource_hours[name] = record.resource_hours.get(name, 0.0) + hours
            record.error = event.error if event.outcome in (Outcome.FAILED, Outcome.DIVERGED) else None
            ending = f"failed: {event.error}" if event.outcome is Outcome.FAILED else event.outcome.value
            line = f"{ending.replace('_', ' ')}  | {self._counts()}"
        self.save()
        if isinstance(event, TrialEnded):
            # An end is written before Tune goes on (bounded wait): Tune's next snapshot then
            # never knows of an end that results.json does not (a resume trusts both).
            self.flush(ENDED_WRITE_WAIT_S)
        log.info("%s trial %s %s", self._clock(), event.trial_id, line)

    def _reported(self, record: TrialRecord, event: TrialReported) -> str:
        metrics = {k: v for k, v in event.metrics.items() if k in METRIC_NAMES}
        record.metrics, record.samples_seen = metrics, event.samples_seen
        record.checkpoint = event.checkpoint or record.checkpoint
        if better(metrics[self.metric], record.best_metrics.get(self.metric), self.mode):
            record.best_metrics = {**metrics, "samples_seen": event.samples_seen}
        best = self.best()
        line = f"{event.samples_seen:>9,} samples  {self.metric} {metrics[self.metric]:.4g}  | {self._counts()}"
        return line + (f" | best {best.best_metrics[self.metric]:.4g} (trial {best.id})" if best else "")

    def ranked(self) -> list[TrialRecord]:
        return rank(list(self.records.values()), self.metric, self.mode)

    def best(self) -> TrialRecord | None:
        ranked = self.ranked()
        return ranked[0] if ranked and is_best_candidate(ranked[0]) else None

    def counts(self) -> dict[Outcome, int]:
        return count(list(self.records.values()))

    def finished(self) -> dict[str, dict[str, Any]]:
        """Trials that ended (not failed) -> the result that ends them again the same way."""
        final = {}
        for record in self.records.values():
            if record.status in (Outcome.COMPLETED, Outcome.STOPPED_EARLY):
                final[record.id] = {**record.metrics, "samples_seen": record.samples_seen}
            elif record.status is Outcome.DIVERGED:
                final[record.id] = diverged_result(self.metric, record.error, record.samples_seen)
        return final

    def failed(self) -> dict[str, str]:
        """Trials that failed -> their error (a resume without --retry-failed keeps them failed)."""
        return {r.id: r.error or "unknown error" for r in self.records.values() if r.status is Outcome.FAILED}

    def compute(self) -> Compute:
        return compute(list(self.records.values()), self.prices)

    def save(self) -> None:
        """Hand the current state to the writer; never blocks on storage, never raises."""
        trials = [record.to_json() for record in self.records.values()]
        about = {"trials": trials, "compute": self.compute().to_json()}
        self.writer.put(json.dumps(about, indent=2) + "\n")

    def flush(self, timeout: float = 60.0) -> str | None:
        """At the search's end: None once results.json holds the last state, else why not."""
        return self.writer.flush(timeout)

    def _counts(self) -> str:
        return ", ".join(f"{outcome.value.replace('_', ' ')} {n}" for outcome, n in self.counts().items())

    def _clock(self) -> str:
        seconds = int(time.monotonic() - self.start)
        return f"[{seconds // 60:3d}:{seconds % 60:02d}]"


def experiment_dir(space: SearchSpace) -> str:
    """<storage.path>/<storage.name>: an absolute local folder or a gs:// URI (where a search
    keeps results.json and everything else; see search.run)."""
    return storage.join(storage.absolute(space.storage.path), space.storage.name)


def load_results(folder: str) -> tuple[list[TrialRecord], str, str]:
    """(records in the order they started, metric, mode) of a stored search (local or gs://)."""
    path = storage.join(folder, "results.json")
    if not storage.exists(path):
        raise PosetuneError(f"no search results at {folder} (check the name and storage.path=...)")
    about = json.loads(storage.read_text(storage.join(folder, "search.json")))
    records = [TrialRecord.from_json(data) for data in json.loads(storage.read_text(path))["trials"]]
    return records, about["metric"], about["mode"]


# --- Tables -------------------------------------------------------------------------------------


def format_params(params: dict[str, Any]) -> str:
    """optimizer.lr=0.00148 -> lr=0.00148 (the section is rarely needed to recognise a knob)."""
    short = {k: k.rsplit(".", 1)[-1] for k in params}
    if len(set(short.values())) < len(short):
        short = {k: k for k in params}
    return " ".join(f"{short[k]}={v:.3g}" if isinstance(v, float) else f"{short[k]}={v}" for k, v in params.items())


def results_table(records: list[TrialRecord], metric: str) -> list[str]:
    rows = [
        [
            r.id,
            r.status.value,
            f"{r.samples_seen:,}",
            r.best_metrics.get(metric),
            r.best_metrics.get("translation_error_cm"),
            r.best_metrics.get("orientation_error_deg"),
            format_params(r.params),
        ]
        for r in records
    ]
    return format_table(rows, ["trial", "status", "samples", metric, "cm", "deg", "parameters"])


def summary_lines(summary: SearchSummary, top: int = 10) -> list[str]:
    """The final table: best trials first with parameters and metrics, counts, wall time."""
    c = summary.counts
    lines = [
        f"{len(summary.records)} trials in {summary.seconds / 60:.1f} min: {c[Outcome.COMPLETED]} completed, "
        f"{c[Outcome.STOPPED_EARLY]} stopped early by ASHA, {c[Outcome.FAILED]} failed, "
        f"{c[Outcome.DIVERGED]} diverged" + (f", {c[Outcome.RUNNING]} unfinished" if c[Outcome.RUNNING] else ""),
        "",
    ]
    lines += results_table(summary.records[:top], summary.metric)
    lines += ["", f"compute:         {summary.compute.describe()}"]
    lines += [f"error: {problem}" for problem in summary.problems]
    if summary.best_config_file:
        lines += [
            "",
            f"best config:     {summary.best_config_file}",
            f"best checkpoint: {summary.best_checkpoint}",
        ]
    lines.append(f"results:         {storage.join(summary.experiment_dir, 'results.json')}")
    return lines
