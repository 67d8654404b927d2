"""Concurrent reads ahead of a consumer: N threads, at most ``window`` files in memory.

Object storage answers one GET in tens of milliseconds whatever its size; a decoder takes a
similar time per image. Reading a bounded window ahead on a few threads keeps the decoder fed
(decoding, not the network, is the bound) while memory stays flat: at most ``window`` files are
held (being read, or read and not yet taken, plus the one handed out), whatever the drop's size.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
from collections.abc import Callable, Generator, Iterable
from typing import TypeVar

T = TypeVar("T")


def read_ahead(read: Callable[[T], bytes], items: Iterable[T], *, threads: int = 8,
               window: int = 16) -> Generator[tuple[T, bytes | Exception], None, None]:
    """``(item, data)`` for each item, in order; ``data`` is the exception if its read failed
    (one bad file is the caller's to record, not the end of the drop).

    Closing the iterator early (``break``, an error in the consumer) cancels the reads not yet
    started and waits only for the ones running, each bounded by the backend's timeouts.
    """
    if threads < 1 or window < 1:
        raise ValueError(f"read_ahead needs threads >= 1 and window >= 1, got {threads}, {window}")
    source = iter(items)
    pending: collections.deque[tuple[T, cf.Future[bytes]]] = collections.deque()
    pool = cf.ThreadPoolExecutor(max_workers=min(threads, window), thread_name_prefix="read-ahead")
    try:
        def fill() -> None:
            while len(pending) < window:
                item = next(source, _END)
                if item is _END:
                    return
                pending.append((item, pool.submit(read, item)))  # type: ignore[arg-type]

        fill()
        while pending:
            item, future = pending.popleft()
            try:
                data: bytes | Exception = future.result()
            except Exception as exc:  # noqa: BLE001 - handed to the caller with its item
                data = exc
            del future
            fill()  # the slot is free once the result is taken: refill before handing it out
            yield item, data
            del data
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()
