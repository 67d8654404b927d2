"""The drop-ready gate: ``wait_for_drop`` waits for the night's marker file in the triggerer.

Not the standard provider's ``FileSensor(deferrable=True)``: its ``FileTrigger`` globs a local
path (a folder named with ``[`` or ``*`` would be a pattern, a bucket cannot be polled), ends a
timed-out wait with Airflow's generic deferral timeout (no folder or marker named, no "proceed"
choice) and needs an ``fs_default`` connection. Here the trigger asks the engine's
``marker_exists`` (a local folder or a bucket prefix) and carries its own deadline, so the
operator can say which folder and marker it waited for, or go on if the params say so.

On a bucket the trigger stores only the URL (which names a connection, never a secret) and
resolves the connection in the triggerer when it starts. A refused key, a missing bucket or a
bad connection end the wait at once with the storage's one-line error; an unreachable endpoint
is retried at the next look, up to the deadline.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.triggers.base import BaseTrigger, TriggerEvent

# How often the triggerer looks for the marker (a stat per look; a deployment may set it).
POLL_S = float(os.environ.get("IMAGE_ETL_DROP_POLL_S", "30"))
# The deferral's own limit, beyond the trigger's deadline: only if the triggerer itself is gone.
DEFER_GRACE_S = 600.0


class DropReadyTrigger(BaseTrigger):
    """Fires ``ready`` once ``marker`` is in ``folder``, or ``timeout`` at ``deadline`` (epoch s).

    The deadline is absolute, so a triggerer restart resumes the same wait, not a new one.
    """

    def __init__(self, folder: str, marker: str, deadline: float, poll_s: float = POLL_S):
        super().__init__()
        self.folder, self.marker, self.deadline, self.poll_s = folder, marker, deadline, poll_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"folder": self.folder, "marker": self.marker, "deadline": self.deadline,
                 "poll_s": self.poll_s})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from image_etl.drop_ready import marker_exists
        from image_etl.errors import NOT_RETRYABLE
        from image_etl.storage import StorageError, shown
        from image_etl_airflow.storage import storage_options_async

        try:
            options = await storage_options_async(self.folder)
        except StorageError as exc:
            yield _error_event(exc)
            return
        while True:
            try:
                # In a thread: a stat on a slow mount, a request to a slow endpoint, must not
                # stall the triggerer's loop.
                found = await asyncio.to_thread(marker_exists, self.folder, self.marker, options)
            except StorageError as exc:
                if isinstance(exc, NOT_RETRYABLE):  # refused, missing, misconfigured: final
                    yield _error_event(exc)
                    return
                self.log.warning("%s; looking again in %gs", exc, self.poll_s)
                found = False
            if found:
                self.log.info("drop ready: %s found in %s", self.marker, shown(self.folder))
                yield TriggerEvent({"status": "ready"})
                return
            left = self.deadline - time.time()
            if left <= 0:
                yield TriggerEvent({"status": "timeout"})
                return
            await asyncio.sleep(min(self.poll_s, left))


def _error_event(exc: Exception) -> TriggerEvent:
    """The storage's one-line error (no secret in it: image_etl.storage.errors), by class name
    so that the task raises the same class (and the same retry rule)."""
    return TriggerEvent({"status": "error", "error": type(exc).__name__, "message": str(exc)})


def _raise_storage_error(event: dict[str, Any]) -> None:
    from image_etl.storage import errors

    cls = getattr(errors, str(event.get("error")), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.StorageError)):
        cls = errors.StorageError
    raise cls(str(event.get("message")))


class WaitForDrop(BaseOperator):
    """Without ``drop_ready_marker``: returns at once. With it: returns when the marker is in
    the night's drop folder, deferring to the triggerer (no worker slot) while it is not, up to
    ``drop_wait_timeout``; then fails naming the folder and the marker, or goes on
    (``drop_wait_on_timeout=proceed``)."""

    ui_color = "#e8f0fe"

    def __init__(self, *, run_date: Callable[[Any], dt.date], allowed_roots: tuple[Path, ...] = (),
                 poll_s: float = POLL_S, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run_date = run_date
        self.allowed_roots = allowed_roots
        self.poll_s = poll_s

    def _gate(self, context: Any):
        from image_etl.drop_ready import drop_gate

        return drop_gate(dict(context["params"]), self.run_date(context), self.allowed_roots)

    def execute(self, context: Any) -> None:
        from image_etl.drop_ready import marker_exists
        from image_etl_airflow.storage import storage_options

        gate = self._gate(context)
        if not gate.marker:
            self.log.info("no drop_ready_marker: not waiting")
            return
        if marker_exists(gate.folder, gate.marker, storage_options(gate.folder)):
            self.log.info("drop ready: %s found in %s", gate.marker, gate.where)
            return
        if gate.timeout_s <= 0:
            return self._timed_out(gate)
        self.log.info("waiting up to %gs for %s in %s, in the triggerer (no worker slot held)",
                      gate.timeout_s, gate.marker, gate.where)
        self.defer(trigger=DropReadyTrigger(gate.folder, gate.marker, time.time() + gate.timeout_s,
                                            self.poll_s),
                   method_name="execute_complete",
                   timeout=dt.timedelta(seconds=gate.timeout_s + self.poll_s + DEFER_GRACE_S))

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> None:
        gate = self._gate(context)
        if event and event.get("status") == "ready":
            self.log.info("drop ready: %s found in %s", gate.marker, gate.where)
            return
        if event and event.get("status") == "error":
            _raise_storage_error(event)
        self._timed_out(gate)

    def _timed_out(self, gate: Any) -> None:
        from image_etl.errors import DropNotReadyError

        if gate.on_timeout == "proceed":
            self.log.warning("%s; going on (drop_wait_on_timeout=proceed) with what is there",
                             gate.not_ready().split(";")[0])
            return
        raise DropNotReadyError(gate.not_ready())
