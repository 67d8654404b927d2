"""Two bounded concurrent stages with one stop protocol, for the worker's pipeline.

- :func:`ordered_map` runs a function over items on a thread pool, at most ``window`` results
  ahead of the consumer, and yields the results in order. A worker's exception is raised in
  the consumer at that item (``Future.result``).
- :class:`Writers` runs a job for each result on a few threads; ``put`` blocks while
  ``capacity`` jobs wait. A job's exception is raised by the next ``put`` (or by ``close``).

The protocol: whichever stage fails first, the consumer (the main thread) raises the original
exception; leaving the ``with`` blocks cancels the work not started and joins every thread.
Every wait is a loop of short timed waits that asks ``abort`` (the other stage's check), so
a stage blocked on a slow neighbour notices at once when the third one failed.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")
POLL_S = 0.1  # how often a blocked stage asks whether another one failed


def _no_abort() -> None:
    return None


@contextlib.contextmanager
def ordered_map(fn: Callable[[T], R], items: Iterable[T], *, threads: int, window: int,
                name: str, abort: Callable[[], None] = _no_abort) -> Iterator[Iterator[R]]:
    """``fn`` over ``items`` on ``threads`` threads; the results, in order, as an iterator.

    At most ``window`` results are computed or held ahead of the consumer: that bounds memory.
    ``abort`` is called while waiting and may raise to stop. On leaving the block, work not
    started is cancelled and the threads are joined (a running call finishes first).
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
        pool.shutdown(wait=True, cancel_futures=True)


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
                 name: str = "writer") -> None:
        self._job = job
        self._pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(capacity)
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()

    def __enter__(self) -> Writers:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: Any) -> None:
        drain = exc is None or not (exc is self._error or isinstance(exc, (KeyboardInterrupt,
                                                                            SystemExit)))
        self._pool.shutdown(wait=True, cancel_futures=not drain)
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
            self._pool.submit(self._run, item)
        except BaseException:
            self._slots.release()
            raise

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
