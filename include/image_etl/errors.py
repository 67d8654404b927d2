"""The engine's errors that no retry can fix, in a module light enough for a DAG file.

The DAG's retry policy fails a task at once on these (by their dotted names): a bad parameter,
weights that cannot be used or changed under a run, a staging file that is not where the load
looks, a drop with too many unreadable images, a storage that
answers "no such bucket" or "access denied". Everything else (a database that is down, a
full disk, a GPU busy with another job) may pass and is retried. Standard library only: the
DAG file imports this at parse time.
"""

from __future__ import annotations


class SettingsError(ValueError):
    """A parameter is invalid. The message is ``invalid parameter NAME: problem``."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"invalid parameter {name}: {problem}")
        self.name = name
        self.problem = problem


class ModelLoadError(RuntimeError):
    """The weights file cannot be used; the message names the file and why."""


class WeightsChangedError(ModelLoadError):
    """The weights file changed between discover and infer: the run's rows would mix models."""


class MissingStagingError(RuntimeError):
    """A shard's staging file is not where the load looks (no shared storage between hosts?)."""


class IncompleteNightError(RuntimeError):
    """Some image discover listed has no outcome (a shard never ran): the load is refused."""


class DropNotReadyError(RuntimeError):
    """The drop-ready marker did not appear within drop_wait_timeout (waiting again would not
    help: the run is cleared or re-triggered once the drop is complete)."""


class TooManyFailedError(RuntimeError):
    """More of the drop's images failed than ``max_failed_fraction`` allows."""


def _storage_errors() -> tuple[type[BaseException], ...]:
    # A missing bucket, object or folder, refused credentials and an unusable storage URL or
    # connection: a retry meets the same answer. (Standard library only, like this module.)
    from image_etl.storage.errors import (
        StorageAccessError,
        StorageConfigError,
        StorageNotFoundError,
    )

    return StorageNotFoundError, StorageAccessError, StorageConfigError


NOT_RETRYABLE: tuple[type[BaseException], ...] = (SettingsError, ModelLoadError,
                                                  MissingStagingError, IncompleteNightError,
                                                  DropNotReadyError, TooManyFailedError,
                                                  *_storage_errors())
