"""The drop-ready gate: ``wait_for_drop`` waits for the night's marker file in the triggerer.

Not the standard provider's ``FileSensor(deferrable=True)``: its ``FileTrigger`` globs a local
path (a folder named with ``[`` or ``*`` would be a pattern, a bucket cannot be polled), ends a
timed-out wait with Airflow's generic deferral timeout (no folder or marker named, no "proceed"
choice) and needs an ``fs_default`` connection. Here the trigger asks the engine's
``marker_exists`` (one seam for object storage later) and carries its own deadline, so the
operator can say which folder and marker it waited for, or go on if the params say so.
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

        while True:
            # In a thread: a stat on a slow network mount must not stall the triggerer's loop.
            if await asyncio.to_thread(marker_exists, self.folder, self.marker):
                self.log.info("drop ready: %s found in %s", self.marker, self.folder)
                yield TriggerEvent({"status": "ready"})
                return
            left = self.deadline - time.time()
            if left <= 0:
                yield TriggerEvent({"status": "timeout"})
                return
            await asyncio.sleep(min(self.poll_s, left))


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

        gate = self._gate(context)
        if not gate.marker:
            self.log.info("no drop_ready_marker: not waiting")
            return
        if marker_exists(gate.folder, gate.marker):
            self.log.info("drop ready: %s found in %s", gate.marker, gate.folder)
            return
        if gate.timeout_s <= 0:
            return self._timed_out(gate)
        self.log.info("waiting up to %gs for %s in %s, in the triggerer (no worker slot held)",
                      gate.timeout_s, gate.marker, gate.folder)
        self.defer(trigger=DropReadyTrigger(gate.folder, gate.marker, time.time() + gate.timeout_s,
                                            self.poll_s),
                   method_name="execute_complete",
                   timeout=dt.timedelta(seconds=gate.timeout_s + self.poll_s + DEFER_GRACE_S))

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> None:
        gate = self._gate(context)
        if event and event.get("status") == "ready":
            self.log.info("drop ready: %s found in %s", gate.marker, gate.folder)
            return
        self._timed_out(gate)

    def _timed_out(self, gate: Any) -> None:
        from image_etl.errors import DropNotReadyError

        if gate.on_timeout == "proceed":
            self.log.warning("%s; going on (drop_wait_on_timeout=proceed) with what is there",
                             gate.not_ready().split(";")[0])
            return
        raise DropNotReadyError(gate.not_ready())
