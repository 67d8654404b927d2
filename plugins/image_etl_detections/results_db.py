"""The results database, found as the DAG finds it: connection ``image_etl_db``, else
``IMAGE_ETL_DB_URL``, else the SQLite default (dags/nightly_detections.py ``_db_url``; the
api-server reads connections through the core model, not the task SDK)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

DB_CONN_ID = "image_etl_db"
# The connection is looked up again after this long (an edited connection is picked up).
URL_TTL_S = 60.0

_lock = threading.Lock()
_url: tuple[float, str] | None = None
_engines: dict[str, Any] = {}


def results_url() -> str:
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection

    from image_etl.store import results_url

    try:
        conn = Connection.get_connection_from_secrets(DB_CONN_ID)
    except AirflowNotFoundException:
        conn = None
    return results_url(conn)


def engine() -> Any:
    """One Engine per results URL, migrated to the schema this code reads on first use."""
    global _url
    from image_etl import store

    with _lock:
        now = time.monotonic()
        if _url is None or now - _url[0] > URL_TTL_S:
            _url = (now, results_url())
        url = _url[1]
        if url not in _engines:
            eng = store.engine_from_url(url)
            store.migrate(eng)
            for old in _engines.values():
                old.dispose()
            _engines.clear()
            _engines[url] = eng
            log.info("Detections page reads %s", store.redact_url(url))
        return _engines[url]


def forget() -> None:
    """Drop the cached URL and engines (tests; a changed connection is also seen by the TTL)."""
    global _url
    with _lock:
        for eng in _engines.values():
            eng.dispose()
        _engines.clear()
        _url = None
