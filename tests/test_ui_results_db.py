"""The Detections page and its results database: it never migrates, a read-only role is enough,
the connection's TLS settings hold, and a dead database is a fast 503 that never stalls Airflow.

Real databases (SQLite files, the local PostgreSQL with a role granted only SELECT), real
Airflow auth (SimpleAuthManager JWTs), and for the dead database Airflow's own ``create_app``
served by uvicorn in a fresh process, against a real socket that accepts TCP and never answers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from image_etl import store

from .conftest import ROOT
from .pg import fresh_database, pg_url  # noqa: F401  (session fixture: a fresh PostgreSQL database)
from .test_ui_plugin import PLUGINS, auth, bearer  # noqa: F401  (auth: a module fixture)

UPGRADE = "python -m image_etl db upgrade"


@pytest.fixture()
def page(auth, monkeypatch):  # noqa: F811
    """A TestClient of the plugin's app; ``page.use(url)`` points it at a results DB."""
    from fastapi.testclient import TestClient

    from image_etl_detections import results_db
    from image_etl_detections.app import create_app

    monkeypatch.delenv("AIRFLOW_CONN_IMAGE_ETL_DB", raising=False)

    def use(url: str) -> None:
        monkeypatch.setenv("IMAGE_ETL_DB_URL", url)
        results_db.forget()

    with TestClient(create_app()) as client:
        client.use = use
        yield client
    results_db.forget()


def _models(page):
    return page.get("/api/models", headers=bearer("viewer"))


def _revision(url: str) -> str | None:
    engine = store.engine_from_url(url)
    try:
        return store.current_revision(engine)
    finally:
        engine.dispose()


# --- the page never migrates -------------------------------------------------------------------------

def test_the_page_never_migrates_it_says_how_to_upgrade(page, tmp_path, monkeypatch):
    head = store.head_revision()
    empty = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    page.use(empty)
    r = _models(page)
    assert r.status_code == 503 and UPGRADE in r.json()["detail"], r.text
    assert "no image_etl schema yet" in r.json()["detail"] and "\n" not in r.json()["detail"]
    assert _revision(empty) is None  # nothing was created

    behind = f"sqlite:///{tmp_path / 'behind.sqlite'}"
    engine = store.engine_from_url(behind)
    store.migrate(engine, "0001")
    # Long enough that the migration below fits in the back-off on a loaded CI machine.
    monkeypatch.setenv("IMAGE_ETL_UI_DB_RETRY_S", "3")
    page.use(behind)
    r = _models(page)
    assert r.status_code == 503 and UPGRADE in r.text and f"revision 0001, this page reads {head}" in r.text
    assert r.headers["retry-after"] == "3"
    assert _revision(behind) == "0001"
    # The operator upgrades; after the back-off the page reads it, no restart needed.
    store.migrate(engine)
    engine.dispose()
    assert _models(page).status_code == 503  # still within the back-off: not tried again
    time.sleep(3.1)
    r = _models(page)
    assert r.status_code == 200 and r.json()["models"] == [], r.text


@pytest.mark.postgres
def test_a_read_only_role_is_enough_and_gets_the_upgrade_hint(page, monkeypatch):
    with fresh_database() as owner_url:
        role, password = f"ro_{uuid.uuid4().hex[:10]}", "ro-" + uuid.uuid4().hex
        admin = sa.create_engine(owner_url, isolation_level="AUTOCOMMIT")
        db = make_url(owner_url).database
        ro_url = make_url(owner_url).set(username=role, password=password)
        ro = ro_url.render_as_string(hide_password=False)
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
                conn.exec_driver_sql(f'REVOKE ALL ON DATABASE "{db}" FROM PUBLIC')
                conn.exec_driver_sql(f'GRANT CONNECT ON DATABASE "{db}" TO {role}')
                conn.exec_driver_sql("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
                conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA public TO {role}")
                conn.exec_driver_sql(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON "
                                     f"TABLES TO {role}")
            owner = store.engine_from_url(owner_url)
            store.migrate(owner, "0001")
            page.use(ro)
            r = _models(page)
            assert r.status_code == 503 and UPGRADE in r.text and "revision 0001" in r.text, r.text
            assert password not in r.text
            store.migrate(owner)
            owner.dispose()
            page.use(ro)
            r = _models(page)
            assert r.status_code == 200 and r.json()["models"] == [], r.text
            # The role really is read-only: the page could not have migrated with it.
            with sa.create_engine(ro).connect() as conn, pytest.raises(sa.exc.ProgrammingError):
                conn.exec_driver_sql("CREATE TABLE t (x int)")
        finally:
            page.use("sqlite://")  # the page lets go of its connections before the DROP
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP OWNED BY {role}')
            admin.dispose()
    with sa.create_engine(owner_url.rsplit("/", 1)[0] + "/postgres",
                          isolation_level="AUTOCOMMIT").connect() as conn:
        conn.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")


@pytest.mark.postgres
def test_sslmode_require_of_the_connection_is_a_tls_503_never_clear_text(page, pg_url,  # noqa: F811
                                                                        monkeypatch):
    secret = "pw-" + uuid.uuid4().hex
    url = make_url(pg_url).set(drivername="postgresql", password=secret)
    monkeypatch.setenv("AIRFLOW_CONN_IMAGE_ETL_DB", url.update_query_dict({"sslmode": "require"})
                       .render_as_string(hide_password=False))
    from image_etl_detections import results_db

    results_db.forget()
    r = _models(page)
    assert r.status_code == 503, r.text
    assert "server does not support SSL, but SSL was required" in r.text and secret not in r.text
    # Control: the same connection without sslmode reads (trust auth ignores the password).
    monkeypatch.setenv("AIRFLOW_CONN_IMAGE_ETL_DB", url.render_as_string(hide_password=False))
    engine = store.engine_from_url(pg_url)
    store.migrate(engine)
    engine.dispose()
    results_db.forget()
    assert _models(page).status_code == 200


# --- the user comes from Airflow's public dependency ----------------------------------------------------

def test_the_user_is_airflows_get_user_dependency(page):
    """The app asks FastAPI for Airflow's ``get_user`` (GetUserDep), not a call of its own: an
    override of that dependency is the user the page sees."""
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.api_fastapi.core_api.security import get_user

    assert page.get("/").status_code == 401
    page.app.dependency_overrides[get_user] = lambda: SimpleAuthManagerUser(username="o", role="viewer")
    try:
        assert page.get("/").status_code == 200  # no token at all: the override's user
        page.app.dependency_overrides[get_user] = lambda: SimpleAuthManagerUser(username="n", role=None)
        assert page.get("/").status_code == 403
    finally:
        page.app.dependency_overrides.clear()


# --- a dead database, through Airflow's own app -----------------------------------------------------

SERVE = textwrap.dedent("""
    import concurrent.futures as cf, json, socket, threading, time
    import httpx, uvicorn
    from airflow.api_fastapi.app import create_app, get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    app = create_app(apps="core")
    token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="v", role="viewer"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = "http://127.0.0.1:%d" % sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    auth = {"Authorization": "Bearer " + token}

    def get(path, headers=None):
        started = time.monotonic()
        try:
            r = httpx.get(base + path, headers=headers, timeout=20)
            return {"status": r.status_code, "text": r.text, "retry": r.headers.get("retry-after"),
                    "s": time.monotonic() - started}
        except httpx.TimeoutException:
            return {"status": None, "text": "client timeout", "s": time.monotonic() - started}

    assert get("/detections/", {"Cookie": "_token=" + token})["status"] == 200  # no DB involved
    out = {}
    with cf.ThreadPoolExecutor(16) as pool:
        first = [pool.submit(get, "/detections/api/models", auth) for _ in range(8)]
        time.sleep(0.5)
        out["pending"] = sum(not f.done() for f in first)
        out["health"] = get("/api/v2/monitor/health")
        out["version"] = get("/api/v2/version", auth)
        out["first"] = [f.result() for f in first]
        out["second"] = list(pool.map(lambda _: get("/detections/api/images/1", auth), range(8)))
    print("RESULT " + json.dumps(out))
    server.should_exit = True
""")


@pytest.fixture()
def black_hole():
    """A port that completes the TCP handshake and never answers; it counts the connections."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    held: list[socket.socket] = []  # kept open: closing would answer (EOF)

    def accept() -> None:
        while True:
            try:
                held.append(sock.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield sock.getsockname()[1], held
    sock.close()
    for conn in held:
        conn.close()


@pytest.mark.slow
def test_a_dead_database_is_a_fast_503_and_airflow_keeps_answering(black_hole, airflow_home):
    port, held = black_hole
    secret = "pw-" + uuid.uuid4().hex
    env = {**os.environ, "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS),
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
           "IMAGE_ETL_DB_URL": f"postgresql+psycopg2://etl:{secret}@127.0.0.1:{port}/results",
           "IMAGE_ETL_DB_CONNECT_TIMEOUT_S": "4", "IMAGE_ETL_UI_DB_RETRY_S": "60",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "include"), os.environ.get("PYTHONPATH", "")])}
    env.pop("AIRFLOW_CONN_IMAGE_ETL_DB", None)
    done = subprocess.run([sys.executable, "-c", SERVE], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    first, second = out["first"], out["second"]
    # Eight concurrent requests while the database never answers: one connects, the others
    # wait for its outcome; all are a 503 with one line saying why, within the connect timeout
    # (4 s) and some slack (this machine may be busy: the margins are wide, the counts exact).
    assert [r["status"] for r in first] == [503] * 8, first
    for r in first:
        detail = json.loads(r["text"])["detail"]
        assert "timeout expired" in detail and "\n" not in detail and secret not in detail, detail
        assert r["s"] < 12, first
    assert max(r["s"] for r in first) > 3.5  # they did wait for the connect timeout
    # Meanwhile Airflow's own routes answered, without waiting for the database.
    assert out["pending"] >= 1, out
    assert out["health"]["status"] == 200 and out["health"]["s"] < 3, out["health"]
    assert out["version"]["status"] == 200 and out["version"]["s"] < 3, out["version"]
    # Within the back-off: a 503 without a connect (faster than one), the same reason.
    assert [r["status"] for r in second] == [503] * 8, second
    assert all(r["s"] < 3 and r["retry"] == "60" for r in second), second
    assert json.loads(second[0]["text"])["detail"] == json.loads(first[0]["text"])["detail"]
    assert len(held) == 1, f"{len(held)} connection attempts; one check, then the back-off"
    assert secret not in done.stdout + done.stderr
