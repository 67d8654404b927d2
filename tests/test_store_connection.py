"""What the results DB connection means: every extra of the Airflow Connection reaches libpq,
every engine has a connect and a statement timeout, and nothing waits on a dead server.

Real PostgreSQL (the local server, no TLS), a real listening socket that never answers, and
the DAG itself (dag.test) for "sslmode=require must fail, never fall back to clear text".
"""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
import types
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from image_etl import store, synth
from image_etl.store import StoreError, Timeouts, engine_from_url, redact_url, url_from_connection

from .pg import pg_url  # noqa: F401  (session fixture: a fresh PostgreSQL database)
from .test_dag import _day_run, _immediate_retries, _state, _task_instances, dag, dag_env  # noqa: F401

TLS_REFUSED = "server does not support SSL, but SSL was required"


def _conn(url: str, extra: dict | None = None, password: str | None = None):
    """An Airflow Connection's fields, as the DAG (task SDK) and the UI (core model) see them."""
    u = make_url(url)
    return types.SimpleNamespace(conn_type="postgres", host=u.host, port=u.port, login=u.username,
                                 password=password or u.password, schema=u.database,
                                 extra_dejson=extra or {})


@pytest.fixture()
def black_hole():
    """A port that accepts TCP (the kernel completes the handshake) and never answers: a
    black-holed address or a hung PgBouncer, as libpq sees it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        yield sock.getsockname()[1]


# --- the connection's extras ----------------------------------------------------------------------

def test_every_libpq_extra_of_the_connection_reaches_the_url():
    extra = {"sslmode": "verify-full", "sslrootcert": "/etc/ssl/ca.pem", "sslcert": "/etc/ssl/c.pem",
             "sslkey": "/etc/ssl/c.key", "sslpassword": "key-passphrase", "connect_timeout": 7,
             "options": "-c search_path=results", "application_name": "image_etl",
             "keepalives": True, "keepalives_idle": 30, "target_session_attrs": "read-write",
             "sqlalchemy_query": {"gssencmode": "disable"},
             "cursor": "dictcursor", "sqlalchemy_scheme": "postgresql", "aws_conn_id": "aws"}
    url = url_from_connection("postgres", host="db", port=5432, login="etl", password="pw",
                              schema="detections", extra=extra)
    query = dict(make_url(url).query)
    assert query == {"sslmode": "verify-full", "sslrootcert": "/etc/ssl/ca.pem",
                     "sslcert": "/etc/ssl/c.pem", "sslkey": "/etc/ssl/c.key",
                     "sslpassword": "key-passphrase", "connect_timeout": "7",
                     "options": "-c search_path=results", "application_name": "image_etl",
                     "keepalives": "1", "keepalives_idle": "30",
                     "target_session_attrs": "read-write", "gssencmode": "disable"}
    # The key's passphrase is a secret like the password.
    assert "key-passphrase" not in redact_url(url) and "pw@" not in redact_url(url)
    # The DAG and the page go through results_url(conn): the same extras.
    assert store.results_url(_conn(url, extra)) == url_from_connection(
        "postgres", host="db", port=5432, login="etl", password="pw", schema="detections", extra=extra)


def test_extras_image_etl_cannot_honour_are_refused_not_ignored():
    for extra, name in (({"iam": True}, "iam"), ({"redshift": "true"}, "redshift"),
                        ({"sslmode": {"nested": 1}}, "sslmode"),
                        ({"sqlalchemy_query": "sslmode=require"}, "sqlalchemy_query")):
        with pytest.raises(StoreError, match=f"image_etl_db: extra '{name}'"):
            url_from_connection("postgres", host="db", extra=extra)


# --- sslmode=require against a server without TLS ------------------------------------------------------

@pytest.mark.postgres
def test_sslmode_require_fails_with_a_tls_error_never_in_clear_text(pg_url):  # noqa: F811
    secret = "pw-" + uuid.uuid4().hex
    plain = store.results_url(_conn(pg_url, {"sslmode": "disable"}, password=secret))
    engine = engine_from_url(plain)  # trust auth: the server ignores the password
    try:
        with engine.connect() as conn:  # control: the same server and role, in clear text
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        engine.dispose()
    tls = store.results_url(_conn(pg_url, {"sslmode": "require"}, password=secret))
    engine = engine_from_url(tls)
    try:
        with pytest.raises(StoreError) as err, engine.connect():
            pass
    finally:
        engine.dispose()
    assert TLS_REFUSED in str(err.value) and secret not in str(err.value), err.value


@pytest.mark.slow
@pytest.mark.postgres
def test_the_dag_honours_sslmode_require_of_its_connection(dag, dag_env, pg_url, monkeypatch,  # noqa: F811
                                                           capfd, caplog):
    """AIRFLOW_CONN_IMAGE_ETL_DB=postgresql://...?sslmode=require, a server without TLS: the run
    fails at its first database task with the TLS error, and writes nothing in clear text."""
    _, conf, tmp = dag_env
    secret = "pw-" + uuid.uuid4().hex
    day = dt.date(2026, 5, 6)
    synth.make_drop(tmp / "tls", day, 1, width=256, height=1500, seed=5)
    conf = {**conf, "drop_dir": str(tmp / "tls" / "{date}")}
    url = make_url(pg_url).set(drivername="postgresql", password=secret)
    monkeypatch.setenv("AIRFLOW_CONN_IMAGE_ETL_DB", url.update_query_dict({"sslmode": "require"})
                       .render_as_string(hide_password=False))
    with _immediate_retries(dag, retries=0):
        run = _day_run(dag, conf, day)
    assert _state(run) == "failed"
    assert _state(_task_instances(run)["discover"]) == "failed"
    logs = capfd.readouterr().out + capfd.readouterr().err + caplog.text
    assert TLS_REFUSED in logs and secret not in logs
    engine = sa.create_engine(pg_url)
    try:  # nothing reached the database: no schema was made
        assert "image_etl_alembic_version" not in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


# --- timeouts on every engine ---------------------------------------------------------------------

@pytest.mark.postgres
def test_postgres_engines_have_connect_and_statement_timeouts(pg_url, monkeypatch):  # noqa: F811
    engine = engine_from_url(pg_url)
    try:
        assert engine.url.query["connect_timeout"] == "5"
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "10min"
    finally:
        engine.dispose()
    monkeypatch.setenv("IMAGE_ETL_DB_STATEMENT_TIMEOUT_S", "0.3")
    monkeypatch.setenv("IMAGE_ETL_DB_CONNECT_TIMEOUT_S", "3")
    # A URL's own options (the tests' search_path) are kept beside the timeout.
    url = make_url(pg_url).update_query_dict({"options": "-c search_path=elsewhere"})
    engine = engine_from_url(url.render_as_string(hide_password=False))
    try:
        assert engine.url.query["connect_timeout"] == "3"
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW search_path").scalar() == "elsewhere"
            started = time.monotonic()
            with pytest.raises(sa.exc.OperationalError, match="statement timeout"):
                conn.exec_driver_sql("SELECT pg_sleep(60)")
            assert time.monotonic() - started < 20  # wide: the server shares a busy machine
    finally:
        engine.dispose()
    # The URL's (the connection's extras') own values win.
    own = make_url(pg_url).update_query_dict({"connect_timeout": "9",
                                              "options": "-c statement_timeout=1234"})
    engine = engine_from_url(own.render_as_string(hide_password=False))
    try:
        assert engine.url.query["connect_timeout"] == "9"
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "1234ms"
    finally:
        engine.dispose()


def test_sqlite_busy_timeout_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGE_ETL_DB_BUSY_TIMEOUT_S", "2.5")
    engine = engine_from_url(f"sqlite:///{tmp_path / 'r.sqlite'}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 2500
    finally:
        engine.dispose()


@pytest.mark.parametrize("name", ["IMAGE_ETL_DB_CONNECT_TIMEOUT_S", "IMAGE_ETL_DB_STATEMENT_TIMEOUT_S",
                                  "IMAGE_ETL_DB_BUSY_TIMEOUT_S"])
@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf", "1e9"])
def test_a_bad_timeout_is_refused_naming_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(StoreError, match=f"invalid parameter {name}: "):
        Timeouts.from_env()


def test_a_server_that_never_answers_fails_the_connect_within_its_timeout(black_hole, monkeypatch):
    monkeypatch.setenv("IMAGE_ETL_DB_CONNECT_TIMEOUT_S", "2")
    secret = "pw-" + uuid.uuid4().hex
    engine = engine_from_url(f"postgresql+psycopg2://etl:{secret}@127.0.0.1:{black_hole}/results")
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            with engine.connect():
                outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
            outcome.append(exc)

    started = time.monotonic()
    # A thread, so that a connect without a timeout fails this test instead of hanging it.
    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout=15)
    took = time.monotonic() - started
    assert not worker.is_alive(), "the connect to a server that never answers did not time out"
    [error] = outcome
    assert isinstance(error, StoreError) and "timeout expired" in str(error), error
    # Wide bounds (a busy machine; libpq before 17 rounds the timeout to whole seconds).
    assert secret not in str(error) and 1.0 < took < 10, took
    engine.dispose()
