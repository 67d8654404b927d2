"""The results schema under Alembic, on a real SQLite file and a real PostgreSQL server.

Autogenerate finds the migrated schema equal to the metadata; a database made by the release
before Alembic (a073aa4, tests/fixtures/release_a073aa4: made by that release's own code) is
adopted without losing a row; SQLite's batch mode rebuilds a referenced table without
cascading into its children; ``python -m image_etl db ...`` upgrades, shows and lists.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from image_etl import cli, store
from image_etl.store import StoreError, revisions

from .pg import _connect_admin, postgres_url

RELEASE = Path(__file__).parent / "fixtures" / "release_a073aa4"
TABLES = ("models", "runs", "images", "detections")  # 0001's
FOLDER_COLS = ("drop_dir", "output_dir")  # 0002's, in images
TIME_COLS = ("loaded_at", "processed_at", "first_seen")
HEAD = store.head_revision()

# A revision after head that SQLite can only make by rebuilding ``images``, which
# ``detections`` references (ON DELETE CASCADE) and whose rows must all survive.
REVISION_NEXT = f'''
import sqlalchemy as sa
from alembic import op

revision = "9999"
down_revision = "{HEAD}"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("note", sa.Text(), nullable=True))
        batch.alter_column("run_key", existing_type=sa.Text(), nullable=True)


def downgrade():
    with op.batch_alter_table("images") as batch:
        batch.alter_column("run_key", existing_type=sa.Text(), nullable=False)
        batch.drop_column("note")
'''


# --- fixtures and helpers -------------------------------------------------------------------

@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def dialect(request) -> str:
    return request.param


@pytest.fixture
def empty_url(dialect, tmp_path) -> Iterator[str]:
    """An empty database: a new SQLite file, or a PostgreSQL database of this test's own."""
    if dialect == "sqlite":
        yield f"sqlite:///{tmp_path / 'results.sqlite'}"
    else:
        yield from postgres_url()


@pytest.fixture
def release_url(dialect, tmp_path) -> Iterator[str]:
    """A copy of the results database release a073aa4 made (schema version 1, before Alembic)."""
    if dialect == "sqlite":
        path = tmp_path / "results.sqlite"
        shutil.copyfile(RELEASE / "results.sqlite", path)
        yield f"sqlite:///{path}"
        return
    for url in postgres_url():  # a database of its own: the dump fills its public schema
        admin = _connect_admin(url)
        try:
            with admin.cursor() as cur:
                cur.execute((RELEASE / "results.postgresql.sql").read_text(encoding="utf-8"))
        finally:
            admin.close()
        yield url


@pytest.fixture
def engine_of():
    engines: list[sa.Engine] = []

    def make(url: str) -> sa.Engine:
        engines.append(store.engine_from_url(url))
        return engines[-1]

    yield make
    for engine in engines:
        engine.dispose()


def rows(engine: sa.Engine, skip: tuple[str, ...] = ()) -> dict[str, list[tuple]]:
    """Every row of 0001's tables (minus ``skip`` columns), in a stable order."""
    meta = sa.MetaData()
    out = {}
    with engine.connect() as conn:
        for name in TABLES:
            table = sa.Table(name, meta, autoload_with=conn)
            cols = [c for c in table.c if c.name not in skip]
            out[name] = sorted((tuple(r) for r in conn.execute(sa.select(*cols))), key=repr)
    return out


def tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def schema_diff(engine: sa.Engine, metadata: sa.MetaData = store.metadata) -> list:
    """What autogenerate would put in a new revision to make the database match ``metadata``."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts=revisions.context_options())
        return compare_metadata(context, metadata)


def reload_release_staging(engine: sa.Engine, tmp_path: Path) -> store.LoadReport:
    """Load the release's staging file again, as the release's run, with today's code."""
    with engine.connect() as conn:
        run = conn.execute(sa.select(store.runs).where(store.runs.c.images > 0)).mappings().one()
    info = store.RunInfo(run_key=run["run_key"], dag_id=run["dag_id"], run_id=run["run_id"],
                         drop_date=run["drop_date"], settings=json.loads(run["settings"]),
                         infer_seconds=run["infer_seconds"])
    staged = shutil.copyfile(RELEASE / "staged.jsonl", tmp_path / "staged.jsonl")
    return store.load_staged(engine, [staged], info)  # names: the ones the release stored


# --- autogenerate -----------------------------------------------------------------------------

def test_autogenerate_finds_the_migrated_schema_equal_to_the_metadata(empty_url, engine_of):
    engine = engine_of(empty_url)
    assert store.migrate(engine) == HEAD
    assert schema_diff(engine) == []
    assert tables(engine) == {*store.metadata.tables, revisions.VERSION_TABLE}

    # The comparison does see a difference: a column more, a type changed.
    changed = sa.MetaData()
    for table in store.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["images"].append_column(sa.Column("note", sa.Text()))
    changed.tables["runs"].c.dag_id.type = sa.Integer()
    kinds = {diff[0] if isinstance(diff, tuple) else diff[0][0] for diff in schema_diff(engine, changed)}
    assert kinds == {"add_column", "modify_type"}


# --- the release before Alembic ----------------------------------------------------------------

def test_a_database_of_the_release_before_alembic_is_adopted_without_losing_a_row(
        release_url, engine_of, tmp_path):
    engine = engine_of(release_url)
    assert revisions.LEGACY_VERSION_TABLE in tables(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version FROM image_etl_schema_version")).all() == [(1,)]
    before = rows(engine)
    assert len(before["images"]) == 13 and len(before["detections"]) == 18 and len(before["runs"]) == 2
    assert store.current_revision(engine) is None

    assert store.migrate(engine, "0001") == "0001"  # adopted: stamped, nothing run
    assert store.current_revision(engine) == "0001"
    assert tables(engine) == {*TABLES, revisions.VERSION_TABLE}  # the old version table is gone
    assert rows(engine) == before  # every row, every value, timestamps included

    assert store.migrate(engine) == HEAD
    assert schema_diff(engine) == []
    assert rows(engine, skip=FOLDER_COLS) == before
    assert tables(engine) == {*store.metadata.tables, revisions.VERSION_TABLE}
    assert store.migrate(engine) == HEAD and rows(engine, skip=FOLDER_COLS) == before

    # Today's load of the same staging file writes the rows the release wrote (same ids).
    released = rows(engine, skip=TIME_COLS)
    report = reload_release_staging(engine, tmp_path)
    assert (report.images, report.detections) == (13, 18)
    assert rows(engine, skip=TIME_COLS) == released
    # New images get new ids: the id sequence went on from where the release left it.
    old_max = max(r[0] for r in before["images"])
    new = tmp_path / "new.jsonl"
    lines = (RELEASE / "staged.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    new.write_text(lines[0] + lines[1].replace('"cam1/img_000.jpg"', '"cam3/new.jpg"'), encoding="utf-8")
    with engine.connect() as conn:
        run = conn.execute(sa.select(store.runs.c.run_key, store.runs.c.drop_date)
                           .where(store.runs.c.images > 0)).one()
    store.load_staged(engine, [new], store.RunInfo("nightly_detections/manual__new", "nightly_detections",
                                                   "manual__new", run.drop_date, {}))
    with engine.connect() as conn:
        new_id = conn.execute(sa.select(store.images.c.id)
                              .where(store.images.c.rel_path == "cam3/new.jpg")).scalar_one()
    assert new_id > old_max


def test_a_schema_version_newer_than_the_release_is_refused(release_url, engine_of):
    engine = engine_of(release_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE image_etl_schema_version SET version = 2"))
    before = rows(engine)
    with pytest.raises(StoreError, match="schema version 2 .* newer than this code knows"):
        store.migrate(engine)
    assert revisions.LEGACY_VERSION_TABLE in tables(engine) and revisions.VERSION_TABLE not in tables(engine)
    assert rows(engine) == before


# --- a later revision ----------------------------------------------------------------------------

def test_a_revision_rebuilding_a_referenced_table_keeps_every_row(
        release_url, engine_of, tmp_path, monkeypatch):
    """On SQLite the batch rebuild drops ``images``; with foreign keys on, that drop would
    delete every detection (ON DELETE CASCADE). migrate() turns them off for its transaction."""
    engine = engine_of(release_url)
    store.migrate(engine)
    before = rows(engine)
    scripts = tmp_path / "migrations"
    shutil.copytree(revisions.MIGRATIONS_DIR, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "9999_image_notes.py").write_text(REVISION_NEXT)
    monkeypatch.setattr(revisions, "MIGRATIONS_DIR", scripts)

    assert store.migrate(engine) == "9999"
    after = rows(engine)
    assert after["detections"] == before["detections"]
    assert after["images"] == [(*r, None) for r in before["images"]]  # the new column, empty
    with engine.connect() as conn:  # a pooled connection: foreign keys are on again
        if engine.dialect.name == "sqlite":
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        with pytest.raises(sa.exc.IntegrityError):
            conn.execute(store.detections.insert().values(
                image_id=10**9, det_index=0, class_id=0, class_name="x", confidence=0.5,
                x1=0, y1=0, x2=1, y2=1, xc=0, yc=0, w=0, h=0))


# --- the db command -------------------------------------------------------------------------------

def test_db_command_upgrades_shows_and_lists_revisions(tmp_path, capsys):
    path = tmp_path / "results.sqlite"
    shutil.copyfile(RELEASE / "results.sqlite", path)
    url = f"sqlite:///{path}"

    assert cli.main(["db", "current", "--db-url", url]) == 0
    assert capsys.readouterr().out == (f"{url}: revision none: not under Alembic yet "
                                       "(db upgrade creates or adopts the schema)\n")
    assert cli.main(["db", "upgrade", "--db-url", url]) == 0
    assert capsys.readouterr().out == f"{url}: revision {HEAD} (head)\n"
    assert cli.main(["db", "current", "--db-url", url]) == 0
    assert capsys.readouterr().out == f"{url}: revision {HEAD} (head)\n"
    assert cli.main(["db", "history"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].startswith(f"{HEAD} (head): ") and len(listed) == int(HEAD)
    assert listed[-1] == "0001: The results schema: models, runs, images, detections."


def test_db_command_names_an_unreachable_database_without_its_password(capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens once the socket is closed
    url = f"postgresql+psycopg2://etl:hunter2@127.0.0.1:{port}/results"
    assert cli.main(["db", "upgrade", "--db-url", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot connect to the results database "
                          f"postgresql+psycopg2://etl:***@127.0.0.1:{port}/results: ")
    assert "hunter2" not in err and err.count("\n") == 1
