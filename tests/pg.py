"""A real PostgreSQL for tests: a fresh database on a running server, or a throwaway server.

Order of attempts:
1. ``IMAGE_ETL_TEST_PG_ADMIN_URL`` (a URL to a maintenance database such as ``postgres``);
2. the server at 127.0.0.1:5432, user ``postgres`` (trust auth);
3. a throwaway cluster from the PostgreSQL binaries (``initdb``/``pg_ctl``) on a free port,
   run as the ``postgres`` user when the tests run as root.
If none works the tests fail when ``CI`` is set (CI must not skip silently) and skip otherwise.

Use the ``pg_url`` session fixture (``from .pg import pg_url``); it yields a SQLAlchemy URL to
a uniquely named, empty database that is dropped at the end of the session. A test that must
restart its server (tests/test_crash.py) starts its own with ``throwaway_cluster()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

DEFAULT_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


class PostgresUnavailable(RuntimeError):
    pass


def _connect_admin(url: str, timeout_s: int = 5):
    """A psycopg2 connection in autocommit mode, from a SQLAlchemy-style URL."""
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(url)
    kwargs = {"host": u.host, "port": u.port or 5432, "user": u.username, "password": u.password,
              "dbname": u.database or "postgres", "connect_timeout": timeout_s}
    kwargs.update({k: v for k, v in u.query.items() if isinstance(v, str)})
    conn = psycopg2.connect(**{k: v for k, v in kwargs.items() if v is not None})
    conn.autocommit = True
    return conn


def _reachable(url: str) -> bool:
    import psycopg2

    try:
        _connect_admin(url, timeout_s=3).close()
    except psycopg2.Error:
        return False
    return True


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A throwaway PostgreSQL server: its admin URL, and a restart (for crash tests)."""

    url: str
    _restart: Callable[[], None]

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: ends every session (open transactions roll back) and
        waits until the server accepts connections again."""
        self._restart()


@contextlib.contextmanager
def throwaway_server() -> Iterator[str]:
    """Start a temporary PostgreSQL cluster; yield its admin URL; stop and delete it."""
    with throwaway_cluster() as cluster:
        yield cluster.url


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    """Start a temporary PostgreSQL cluster; yield it; stop and delete it."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        raise PostgresUnavailable("no initdb/pg_ctl found (/usr/lib/postgresql/*/bin or PATH)")
    as_root = os.geteuid() == 0
    prefix: list[str] = []
    if as_root:
        try:
            pg_user = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable("running as root and there is no 'postgres' user") from None
        runuser = shutil.which("runuser")
        prefix = [runuser, "-u", "postgres", "--"] if runuser else []
    # Not under pytest's tmp dir: that one is private to root and the server runs as postgres.
    base = Path(tempfile.mkdtemp(prefix="image_etl_pg_"))
    data, log = base / "data", base / "server.log"
    port = _free_port()

    def run(cmd: list[str]) -> None:
        if as_root and not prefix:
            cmd = ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(map(_sh_quote, cmd))]
        else:
            cmd = prefix + cmd
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode:
            raise PostgresUnavailable(f"{' '.join(cmd)} failed ({res.returncode}): "
                                      f"{res.stderr.strip() or res.stdout.strip()}")

    started = False
    try:
        if as_root:
            os.chown(base, pg_user.pw_uid, pg_user.pw_gid)
        run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
        run([pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
             f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off", "start"])
        started = True

        def restart() -> None:
            # -l again: without it the new server would write to our (captured) stdout and
            # pg_ctl's caller would wait for that pipe to close. postmaster.opts keeps the -o.
            run([pg_ctl, "-D", str(data), "-l", str(log), "-m", "fast", "-w", "-t", "60",
                 "restart"])

        yield Cluster(f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres", restart)
    finally:
        if started:
            with contextlib.suppress(PostgresUnavailable, subprocess.TimeoutExpired):
                run([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(base, ignore_errors=True)


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


@contextlib.contextmanager
def _admin_url() -> Iterator[str]:
    explicit = os.environ.get("IMAGE_ETL_TEST_PG_ADMIN_URL")
    if explicit:
        if not _reachable(explicit):
            raise PostgresUnavailable("IMAGE_ETL_TEST_PG_ADMIN_URL is set but not reachable")
        yield explicit
    elif _reachable(DEFAULT_ADMIN_URL):
        yield DEFAULT_ADMIN_URL
    else:
        with throwaway_server() as url:
            yield url


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """Yield a URL to a new, uniquely named database; drop it afterwards."""
    from sqlalchemy.engine import make_url

    with _admin_url() as admin_url:
        name = f"image_etl_test_{uuid.uuid4().hex[:12]}"
        _admin_execute(admin_url, f'CREATE DATABASE "{name}" ENCODING \'UTF8\' TEMPLATE template0')
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            # WITH (FORCE) (PostgreSQL 13+) ends connections a test forgot to close.
            _admin_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _admin_execute(admin_url: str, sql: str) -> None:
    """One statement on an autocommit admin connection (CREATE/DROP DATABASE need that)."""
    conn = _connect_admin(admin_url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def postgres_url(tmp_path_factory: pytest.TempPathFactory | None = None) -> Iterator[str]:
    """Generator for a session fixture: yields a fresh database's URL, or skips/fails.

    (``tmp_path_factory`` is accepted for fixture symmetry; a throwaway server cannot live
    under pytest's root-private temp dir when it has to run as ``postgres``.)
    """
    stack = contextlib.ExitStack()
    try:
        url = stack.enter_context(fresh_database())
    except (PostgresUnavailable, ImportError, OSError) as e:
        message = f"PostgreSQL is not available for the store tests: {e}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set: refusing to skip)", pytrace=False)
        pytest.skip(message)
    with stack:
        yield url


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory) -> Iterator[str]:
    """SQLAlchemy URL of an empty PostgreSQL database for this test session."""
    yield from postgres_url(tmp_path_factory)


@contextlib.contextmanager
def schema_url(base_url: str) -> Iterator[str]:
    """A URL to ``base_url``'s database with a fresh schema of its own first on the search path;
    the schema is dropped afterwards."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        yield (make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
               .render_as_string(hide_password=False))
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        admin.dispose()
