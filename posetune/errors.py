"""User-facing error types.

Everything a user can fix (a bad config value, a malformed dataset, a missing checkpoint)
raises a ``PosetuneError``; the CLI prints its message on one line and exits with code 2.
Bugs stay ordinary exceptions with tracebacks.
"""


class PosetuneError(Exception):
    """An error the user can fix; its message says what is wrong and how to fix it."""


class ConfigError(PosetuneError):
    """A configuration or search-space file, environment variable or override is invalid."""


class DataError(PosetuneError):
    """A dataset is missing, malformed or empty."""


class StorageError(PosetuneError):
    """A path or URI cannot be read or written (missing, refused, corrupted, read only)."""


class StorageChanged(StorageError):
    """An object changed or went away between listing it and reading the listed version (a
    push in progress): listing again may succeed, so a reader of many objects retries."""


class CheckpointError(PosetuneError):
    """A checkpoint or model cannot be found or read."""


class TrainingDiverged(PosetuneError):
    """The loss became NaN or infinite (raised by `fit`; a run or trial ends as diverged)."""

    def __init__(self, message: str, samples_seen: int = 0):
        super().__init__(message)
        self.samples_seen = samples_seen
