"""Drop readiness: whether a night's drop folder holds its "drop complete" marker.

Uploaders often write a marker (``_SUCCESS``, ``manifest.json``) when a night's drop is
complete. With ``drop_ready_marker`` set, a run waits for that file in the night's folder
(``drop_dir`` with ``{date}`` filled), up to ``drop_wait_timeout`` seconds, before discover
lists anything. The waiting itself is the Airflow glue's (a trigger in the triggerer, no worker
slot held); this module says where to look and looks. Plain Python, no Airflow.

``marker_exists`` is the one place that looks, through ``image_etl.storage``: a local folder
or a bucket prefix (with the options the Airflow glue derives from the URL's connection).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from image_etl.run_settings import RunSettings
from image_etl.settings import check
from image_etl.storage.location import location_text, shown

__all__ = ["DropGate", "drop_gate", "marker_exists"]

# The gate needs only the drop folder: ``{model}`` in output_dir is filled with this instead of
# hashing the weights (which need not be on the host that waits).
_NO_MODEL_SHA = "0" * 64


@dataclasses.dataclass(frozen=True)
class DropGate:
    """Where a run waits, for what, how long, and what it does when the marker never comes."""

    folder: str  # a path, or a URL with its connection id (what the look needs)
    marker: str | None  # None: no gate
    timeout_s: float
    on_timeout: str  # "fail" or "proceed"

    @property
    def where(self) -> str:
        """The folder as messages show it (a URL without its connection id)."""
        return shown(self.folder)

    def not_ready(self) -> str:
        """The message of a run whose drop was not declared ready in time."""
        return (f"drop not ready: the marker {self.marker!r} did not appear in {self.where} "
                f"within drop_wait_timeout={self.timeout_s:g}s; when the drop is complete, "
                "write the marker and clear this task, or re-trigger the run with "
                "drop_wait_on_timeout=proceed to process what is there")


def drop_gate(params: Mapping[str, Any], run_date: dt.date,
              allowed_roots: tuple[Path, ...] = ()) -> DropGate:
    """The run's gate from its params. Backfills and manual runs with ``date`` get the gate of
    the drop they process. With a marker, every param is checked (a bad one fails before any
    wait); without one, the gate is off and leaves the checks to discover, as before."""
    if check("drop_ready_marker", params.get("drop_ready_marker")) is None:
        return DropGate(folder="", marker=None, timeout_s=0.0, on_timeout="fail")
    settings = RunSettings.from_params(params, run_date, allowed_roots,
                                       model_sha256=_NO_MODEL_SHA, check_files=False)
    return DropGate(folder=location_text(settings.drop_dir), marker=settings.drop_ready_marker,
                    timeout_s=settings.drop_wait_timeout, on_timeout=settings.drop_wait_on_timeout)


def marker_exists(folder: str, name: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``name`` is in ``folder`` (a folder or prefix that does not exist yet: no).
    ``options``: how to reach an object URL's bucket (None for a local folder). A missing
    bucket or refused credentials raise (a StorageError naming the bucket), not "not yet"."""
    from image_etl.storage import open_storage

    return open_storage(folder, options).exists(name)
