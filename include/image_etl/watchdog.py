"""The stall watchdog: a shard that stops making progress ends its process, naming the stage.

Why the process and not an exception: a thread blocked in native code (an OpenVINO or CUDA
call that never returns, a read from a hung network mount) never runs Python again, so no
exception reaches it, and Airflow's ``execution_timeout`` (a signal handled in Python, in the
task process) cannot end it either. The task would hold its GPU lease and its pool slot until
someone killed the worker. Ending the process releases the lease (the OS drops the ``flock``
with the file descriptor), and Airflow's task supervisor marks a task whose process exited
non-zero up for retry, which resumes the shard.

The pipeline's main thread says which stage it is in (:meth:`Watchdog.mark`): waiting for the
next decoded image, running the forward pass, waiting for a writer, shutting down. Every mark
is progress. When one stage lasts longer than the limit, the watchdog thread logs one line
naming the stage and how long it has been stuck, flushes the logs, and ends the process with
:data:`STALL_EXIT_STATUS` (``os._exit``: no cleanup that could wait on the stuck thread).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

STALL_EXIT_STATUS = 75  # EX_TEMPFAIL: a temporary failure, worth a retry
STALL_MARGIN = 4.0  # a stage may take this many times its time limit before it counts as stuck
LOG_FLUSH_S = 5.0  # the most the logs may take to flush before the process ends anyway


def stall_limit_s(timeout_per_image_s: float, batch_size: int) -> float:
    """How long one stage may go without progress: ``STALL_MARGIN`` x ``timeout_per_image_s``
    per model input of a batch (the longest single step is a forward pass on a whole batch;
    a decode or a write is one image). 160 s with the defaults (5 s, batches of 8)."""
    return STALL_MARGIN * timeout_per_image_s * max(1, batch_size)


def exit_process(message: str) -> None:
    """Log ``message``, flush every log handler, and end the process at once."""
    # If a logging lock is held by the stuck thread, logging would block: end anyway.
    threading.Timer(LOG_FLUSH_S, os._exit, (STALL_EXIT_STATUS,)).start()
    log.critical(message)
    _flush_logs()
    os._exit(STALL_EXIT_STATUS)


def _flush_logs() -> None:
    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            try:
                handler.flush()
            except Exception:  # a broken handler must not keep the process alive
                pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


class Watchdog:
    """Watches the stage the pipeline's main thread is in; calls ``on_stall`` (default:
    :func:`exit_process`) with a message naming it when it lasts over ``limit_s``.

    Use as a context manager around the shard. :meth:`linger` keeps it watching after the
    shard ended with a thread that could not be joined (the interpreter would wait for it at
    exit): the process then ends within ``limit_s`` unless it exits by itself first.
    """

    def __init__(self, limit_s: float, *, on_stall: Callable[[str], None] = exit_process,
                 what: str = "shard") -> None:
        if not limit_s > 0:
            raise ValueError(f"invalid parameter limit_s: {limit_s!r}; must be > 0")
        self.limit_s = limit_s
        self.what = what
        self._on_stall = on_stall
        self._lock = threading.Lock()
        self._stage = "start"
        self._since = time.monotonic()
        self._stop = threading.Event()
        self._lingering = False
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
        self.fired: str | None = None  # the message, once it fired

    def __enter__(self) -> Watchdog:
        self.mark("start")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._lingering:
            self._stop.set()
            self._thread.join(timeout=5.0)

    def mark(self, stage: str) -> None:
        """The main thread now works in (or waits on) ``stage``; entering it is progress."""
        with self._lock:
            self._stage, self._since = stage, time.monotonic()

    def linger(self, stage: str) -> None:
        """Keep watching after the shard ended, in ``stage`` (see the class)."""
        self._lingering = True
        self.mark(stage)

    def _watch(self) -> None:
        poll = min(1.0, self.limit_s / 4)
        while not self._stop.wait(poll):
            with self._lock:
                stage, stuck_s = self._stage, time.monotonic() - self._since
            if stuck_s > self.limit_s:
                self.fired = (f"{self.what} stalled in stage '{stage}': no progress for "
                              f"{stuck_s:.1f} s (limit {self.limit_s:g} s = {STALL_MARGIN:g} x "
                              f"timeout_per_image_s x batch_size); ending the process with exit "
                              f"status {STALL_EXIT_STATUS} so that its device lease is released "
                              "and a retry resumes the shard")
                self._on_stall(self.fired)
                return
