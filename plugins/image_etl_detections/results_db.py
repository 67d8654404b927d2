"""The results database as the Detections page reads it: found as the DAG finds it (connection
``image_etl_db``, else ``IMAGE_ETL_DB_URL``, else the SQLite default; the api-server reads
connections through the core model, not the task SDK), checked, never changed.

The page must never stall the Airflow UI, whose routes share the api-server's thread pool:

* every connection has a connect timeout and a statement timeout (``Timeouts``; the page's
  statement timeout is ``IMAGE_ETL_UI_DB_STATEMENT_TIMEOUT_S``, shorter than the tasks');
* the api-server never migrates: it reads the schema's revision and, when it is not the one
  this code reads, answers that an operator must run ``python -m image_etl db upgrade`` (a
  read-only database role is enough for the page);
* one request at a time checks the database (the others wait at most the connect timeout for
  its outcome; none holds a lock across a connect); a failed check, or a query that lost the
  server, is remembered for ``IMAGE_ETL_UI_DB_RETRY_S`` seconds, during which every request
  is answered at once with the same one-line reason instead of connecting again.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

DB_CONN_ID = "image_etl_db"
# A working engine's URL and schema are checked again after this long (an edited connection
# or a downgraded schema is seen).
URL_TTL_S = 60.0
UI_STATEMENT_TIMEOUT_ENV = "IMAGE_ETL_UI_DB_STATEMENT_TIMEOUT_S"
UI_STATEMENT_TIMEOUT_S = 15.0
RETRY_ENV = "IMAGE_ETL_UI_DB_RETRY_S"
RETRY_S = 15.0
UPGRADE_HINT = "run `python -m image_etl db upgrade` with the results database's owner"


class Unavailable(Exception):
    """The page cannot read the results database now: one line, no secret, for the 503."""


@dataclasses.dataclass
class _Ready:
    url: str
    engine: Any
    checked_at: float


@dataclasses.dataclass
class _Check:
    """The one check in flight; the requests that arrive meanwhile wait for its outcome."""

    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    url: str = ""
    engine: Any = None
    error: Unavailable | None = None


_lock = threading.Lock()  # guards the three below; never held across I/O
_ready: _Ready | None = None
_down: tuple[float, str] | None = None  # (until, reason)
_check: _Check | None = None


def results_url() -> str:
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection

    from image_etl.store import results_url

    try:
        conn = Connection.get_connection_from_secrets(DB_CONN_ID)
    except AirflowNotFoundException:
        conn = None
    return results_url(conn)


@dataclasses.dataclass(frozen=True)
class Bounds:
    timeouts: Any  # image_etl.store.Timeouts
    retry_s: float


def bounds() -> Bounds:
    """The page's bounds from the environment: the tasks' connect timeout, its own (shorter)
    statement timeout, the back-off after a failure. A bad value is Unavailable, naming it."""
    from image_etl.store import StoreError, Timeouts
    from image_etl.store.engine import seconds_from_env

    try:
        base = Timeouts.from_env(statement_env=UI_STATEMENT_TIMEOUT_ENV,
                                 statement_default=UI_STATEMENT_TIMEOUT_S)
        retry_s = seconds_from_env(RETRY_ENV, RETRY_S, minimum=0)
    except StoreError as exc:
        raise Unavailable(str(exc)) from None
    page = dataclasses.replace(base, busy_s=min(base.busy_s, base.statement_s or base.busy_s))
    return Bounds(page, retry_s)


def retry_s() -> float:
    """The back-off after a failure (for the 503's Retry-After)."""
    try:
        return bounds().retry_s
    except Unavailable:
        return RETRY_S


def engine() -> Any:
    """The page's Engine, checked; raises Unavailable (at once while a failure is remembered)."""
    global _check
    limits = bounds()
    now = time.monotonic()
    with _lock:
        if _down is not None and now < _down[0]:
            raise Unavailable(_down[1])
        if _ready is not None and now - _ready.checked_at < URL_TTL_S:
            return _ready.engine
        stale = _ready
        check, mine = (_check, False) if _check is not None else (_Check(), True)
        _check = check
    if not mine:
        if stale is not None:  # being re-checked by another request: keep reading meanwhile
            return stale.engine
        return _outcome_of(check, limits)
    try:
        check.url, check.engine = _checked_engine(stale, limits)
    except Unavailable as exc:
        check.error = exc
    except Exception:  # a bug: still a 503 for everyone waiting, never a half-set state
        log.exception("Detections page: checking the results database failed")
        check.error = Unavailable("checking the results database failed (see the api-server log)")
    finally:
        _finish(check, stale, limits)
    return _outcome_of(check, limits)


def _outcome_of(check: _Check, limits: Bounds) -> Any:
    wait_s = limits.timeouts.connect_s + 3.0  # a check is a connect and two short queries
    if not check.done.wait(wait_s):
        raise Unavailable(f"the results database did not answer within {wait_s:.0f} s")
    if check.error is not None:  # a fresh exception per request: threads share the check
        raise Unavailable(str(check.error))
    return check.engine


def _checked_engine(stale: _Ready | None, limits: Bounds) -> tuple[str, Any]:
    """An Engine for the current URL whose schema is the one this code reads (or Unavailable)."""
    from image_etl import store

    try:
        url = results_url()
    except store.StoreError as exc:  # a bad connection (its message hides the password)
        raise Unavailable(_one_line(exc)) from None
    except Exception as exc:  # Airflow's own database or secrets backend; details in the log
        log.exception("Detections page: cannot read the %s connection", DB_CONN_ID)
        raise Unavailable(f"cannot read the {DB_CONN_ID} connection ({type(exc).__name__})") from None
    reuse = stale is not None and stale.url == url
    try:
        eng = stale.engine if stale is not None and reuse else store.engine_from_url(url, limits.timeouts)
    except store.StoreError as exc:
        raise Unavailable(_one_line(exc)) from None
    try:
        _check_revision(eng)
    except Unavailable:
        if not reuse:
            eng.dispose()
        raise
    if not reuse:
        log.info("Detections page reads %s", store.redact_url(url))
    return url, eng


def _check_revision(eng: Any) -> None:
    """Unavailable unless the database is at the revision this code reads; never migrates."""
    from sqlalchemy.exc import SQLAlchemyError

    from image_etl import store

    try:
        current = store.current_revision(eng)
    except store.StoreError as exc:  # the connect failed (one line, password hidden)
        raise Unavailable(_one_line(exc)) from None
    except SQLAlchemyError as exc:
        log.warning("Detections page: reading the results database's revision failed: %s", exc)
        raise Unavailable(f"cannot read the results database's schema revision "
                          f"({type(getattr(exc, 'orig', None) or exc).__name__})") from None
    head = _head()
    if current == head:
        return
    if current is None:
        raise Unavailable(f"the results database has no image_etl schema yet (this page reads "
                          f"revision {head}): {UPGRADE_HINT}, or let a DAG run create it")
    if current in _known_revisions():
        raise Unavailable(f"the results database is at schema revision {current}, this page "
                          f"reads {head}: {UPGRADE_HINT}")
    raise Unavailable(f"the results database is at schema revision {current}, newer than this "
                      f"api-server's image_etl knows (head {head}): upgrade image_etl here")


@functools.cache
def _head() -> str:
    from image_etl import store

    return store.head_revision()


@functools.cache
def _known_revisions() -> frozenset[str]:
    from image_etl import store

    return frozenset(line.split(":")[0].split(" ")[0] for line in store.history())


def _finish(check: _Check, stale: _Ready | None, limits: Bounds) -> None:
    """Record the check's outcome, wake the requests waiting on it, dispose a replaced engine."""
    global _ready, _down, _check
    old = None
    with _lock:
        if check.error is None:
            _ready, _down = _Ready(check.url, check.engine, time.monotonic()), None
            if stale is not None and stale.engine is not check.engine:
                old = stale.engine
        else:
            _down = (time.monotonic() + limits.retry_s, str(check.error))
            if _ready is not None:
                old, _ready = _ready.engine, None
        _check = None
    check.done.set()
    if old is not None:
        old.dispose()  # connections in use finish; the pool is closed
    if check.error is not None:
        log.warning("Detections page: results database unavailable: %s (not tried again for "
                    "%.0f s)", check.error, limits.retry_s)


def mark_down(reason: str) -> None:
    """A query lost the server: answer the next requests at once, try again after the back-off."""
    global _ready, _down
    until = time.monotonic() + retry_s()
    with _lock:
        _down = (until, _one_line(reason))
        old, _ready = (_ready.engine if _ready is not None else None), None
    if old is not None:
        old.dispose()
    log.warning("Detections page: results database unavailable: %s", _one_line(reason))


def _one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())


def forget() -> None:
    """Drop the engine and any remembered failure (tests; the TTL and back-off do it in time)."""
    global _ready, _down, _check
    with _lock:
        old = _ready.engine if _ready is not None else None
        _ready, _down, _check = None, None, None
    if old is not None:
        old.dispose()
