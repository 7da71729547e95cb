"""The events a search sends its listeners, as plain dataclasses.

The search emits ``SearchStarted`` once every check has passed, ``TrialStarted`` /
``TrialReported`` / ``TrialEnded`` as Tune runs its trials, and ``SearchEnded`` with the summary.
``search.results.SearchResults`` (results.json) and tracking's MLflow run are two listeners.
Nothing here imports Ray, torch or MLflow: tracking imports these and stays Ray-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from posetune.choices import METRIC_NAMES

if TYPE_CHECKING:
    from posetune.config import Config
    from posetune.search.results import SearchSummary

# What a trial reports at each evaluation: the metrics plus training loss and throughput.
REPORTED = (*METRIC_NAMES, "train_loss", "train_images_per_s")


class Outcome(str, Enum):
    """Where a trial (or a training run) stands or how it ended."""

    RUNNING = "running"
    COMPLETED = "completed"  # trained its whole budget
    STOPPED_EARLY = "stopped_early"  # stopped by ASHA
    FAILED = "failed"  # an error
    DIVERGED = "diverged"  # the loss became NaN or infinite
    INTERRUPTED = "interrupted"  # Ctrl-C (training runs; an interrupted trial stays RUNNING)


@dataclass(frozen=True)
class SearchStarted:
    """Every check has passed; the first trial is about to start."""

    folder: str  # the experiment folder (local or gs://)
    resume: bool


@dataclass(frozen=True)
class TrialStarted:
    trial_id: str
    params: dict[str, Any]  # the sampled values
    config: Config  # the trial's whole resolved config


@dataclass(frozen=True)
class TrialReported:
    trial_id: str
    params: dict[str, Any]
    samples_seen: int
    metrics: dict[str, float]  # the names in REPORTED that the trial reported
    checkpoint: str | None  # URI of the trial's checkpoint folder (last.pt, best.pt)


@dataclass(frozen=True)
class TrialEnded:
    trial_id: str
    params: dict[str, Any]
    outcome: Outcome
    samples_seen: int
    error: str | None
    checkpoint: str | None
    resource_hours: dict[str, float]  # what its workers held since it (re)started: {"GPU": h, "CPU": h}


@dataclass(frozen=True)
class SearchEnded:
    summary: SearchSummary
    study: Any  # the searcher's Optuna study (None when it saved none)


TrialEvent = TrialStarted | TrialReported | TrialEnded
SearchEvent = SearchStarted | TrialEvent | SearchEnded


class Listener(Protocol):
    """Receives a search's events in order, on the search's driver process."""

    def on_event(self, event: SearchEvent) -> None: ...
