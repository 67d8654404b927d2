"""Two bounded concurrent stages with one stop protocol, for the worker's pipeline.

- :func:`ordered_map` runs a function over items on a thread pool, at most ``window`` results
  ahead of the consumer, and yields the results in order. A worker's exception is raised in
  the consumer at that item (``Future.result``).
- :class:`Writers` runs a job for each result on a few threads; ``put`` blocks while
  ``capacity`` jobs wait. A job's exception is raised by the next ``put`` (or by ``close``).

The protocol: whichever stage fails first, the consumer (the main thread) raises the original
exception; leaving the ``with`` blocks cancels the work not started and joins every thread.
Every wait is a loop of short timed waits that asks ``abort`` (the other stage's check), so
a stage blocked on a slow neighbour notices at once when the third one failed. Joins are
bounded too: a job that finishes nothing for ``join_timeout_s`` (a thread stuck in I/O or in
native code) makes the join raise :class:`StageStuckError` naming the stage, rather than wait
forever (the caller's watchdog then ends the process, which would wait for that thread at exit).
"""

from __future__ import annotations

import collections
import contextlib
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")
POLL_S = 0.1  # how often a blocked stage asks whether another one failed
JOIN_TIMEOUT_S = 300.0  # default: the longest a join waits for one running job to finish


class StageStuckError(RuntimeError):
    """A stage's thread did not finish its job within the join's bound (names the stage)."""


def _no_abort() -> None:
    return None


def join_jobs(futures: Iterable[Future[Any]], stage: str, timeout_s: float) -> None:
    """Wait for ``futures`` (the stage's running jobs) while they keep finishing: raise
    :class:`StageStuckError` when none finishes for ``timeout_s``."""
    running = {f for f in futures if not f.done()}
    while running:
        done, running = wait_futures(running, timeout=timeout_s, return_when=FIRST_COMPLETED)
        if not done:
            raise StageStuckError(
                f"{stage} stage stuck: {len(running)} job(s) still running after {timeout_s:g} s "
                "without one finishing (a thread blocked in I/O or native code?)")


@contextlib.contextmanager
def ordered_map(fn: Callable[[T], R], items: Iterable[T], *, threads: int, window: int,
                name: str, abort: Callable[[], None] = _no_abort,
                join_timeout_s: float = JOIN_TIMEOUT_S) -> Iterator[Iterator[R]]:
    """``fn`` over ``items`` on ``threads`` threads; the results, in order, as an iterator.

    At most ``window`` results are computed or held ahead of the consumer: that bounds memory.
    ``abort`` is called while waiting and may raise to stop. On leaving the block, work not
    started is cancelled and the running calls are waited for, at most ``join_timeout_s``
    each (then :class:`StageStuckError`, chained to the error that was leaving, if any).
    """
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
    pending: collections.deque[Future[R]] = collections.deque()
    source = iter(items)

    def submit_next() -> None:
        for item in source:
            pending.append(pool.submit(fn, item))
            return

    def results() -> Iterator[R]:
        for _ in range(window):
            submit_next()
        while pending:
            result = wait(pending[0], abort)
            pending.popleft()
            submit_next()
            yield result

    try:
        yield results()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        leaving = sys.exc_info()[1]
        try:
            join_jobs(pending, name, join_timeout_s)
        except StageStuckError as stuck:
            raise stuck from leaving
        pool.shutdown(wait=True)  # every job has finished: the threads end at once


def wait(future: Future[R], abort: Callable[[], None]) -> R:
    """``future.result()`` in short waits, calling ``abort`` between them."""
    while True:
        try:
            return future.result(timeout=POLL_S)
        except FutureTimeout:
            abort()


class Writers:
    """``count`` threads running ``job(item)`` for each ``put`` item, ``capacity`` at most waiting.

    Use as a context manager. Leaving it normally, or because another stage failed, lets the
    jobs already put finish (valid work a retry can skip); leaving it because a job failed, or
    on KeyboardInterrupt / SystemExit, cancels them. A job's error is raised in the caller.
    """

    def __init__(self, job: Callable[[Any], None], *, count: int, capacity: int,
                 name: str = "writer", join_timeout_s: float = JOIN_TIMEOUT_S) -> None:
        self._job = job
        self._name = name
        self._join_timeout_s = join_timeout_s
        self._pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix=name)
        self._jobs: set[Future[None]] = set()  # submitted, not finished
        self._jobs_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(capacity)
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()

    def __enter__(self) -> Writers:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: Any) -> None:
        drain = exc is None or not (exc is self._error or isinstance(exc, (KeyboardInterrupt,
                                                                            SystemExit)))
        self._pool.shutdown(wait=False, cancel_futures=not drain)
        try:
            with self._jobs_lock:
                jobs = list(self._jobs)
            join_jobs(jobs, self._name, self._join_timeout_s)
        except StageStuckError as stuck:
            raise stuck from exc
        self._pool.shutdown(wait=True)  # every job has finished: the threads end at once
        if exc is None:
            self.check()

    def check(self) -> None:
        """Raise the first job's error, if one failed."""
        if self._error is not None:
            raise self._error

    def put(self, item: Any, abort: Callable[[], None] = _no_abort) -> None:
        """Queue ``item``; block while ``capacity`` items wait; raise a job's error."""
        while not self._slots.acquire(timeout=POLL_S):
            self.check()
            abort()
        try:
            self.check()
            job = self._pool.submit(self._run, item)
            with self._jobs_lock:
                self._jobs.add(job)
            job.add_done_callback(self._job_done)
        except BaseException:
            self._slots.release()
            raise

    def _job_done(self, job: Future[None]) -> None:
        with self._jobs_lock:
            self._jobs.discard(job)

    def _run(self, item: Any) -> None:
        try:
            if self._error is None:  # after a failure the attempt is lost: write no more
                self._job(item)
        except BaseException as exc:
            with self._error_lock:
                if self._error is None:
                    self._error = exc
        finally:
            self._slots.release()
