"""The results schema under Alembic, on a real SQLite file and a real PostgreSQL server.

Autogenerate finds the migrated schema equal to the metadata; a database made by the release
before Alembic (a073aa4, tests/fixtures/release_a073aa4: made by that release's own code) is
adopted without losing a row; revision 0002 (each image's folders, the night totals) fills
its columns and tables from a 0001 database's rows, and its downgrade gives back 0001's schema
with every row; SQLite's batch mode rebuilds a referenced table without cascading into its
children; ``python -m image_etl db ...`` upgrades, shows and lists.
"""

from __future__ import annotations

import datetime as dt
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
TOTALS = ("drop_totals", "drop_class_totals")  # 0002's
FOLDER_COLS = ("drop_dir", "output_dir")  # 0002's, in images
IDENTITY_COLS = ("result_key", "caught_up")  # 0003's, in images (after 0002's)
ADDED_COLS = FOLDER_COLS + IDENTITY_COLS
NIGHT_FILES = ("result_settings", "night_files")  # 0003's
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
def schema_0001(dialect, tmp_path) -> Iterator[dict[str, dict[str, list]]]:
    """The schema revision 0001 makes (schema_of), on an empty database of the test's dialect."""
    urls = [f"sqlite:///{tmp_path / 'at_0001.sqlite'}"] if dialect == "sqlite" else postgres_url()
    for url in urls:
        engine = store.engine_from_url(url)
        try:
            assert store.migrate(engine, "0001") == "0001"
            snapshot = schema_of(engine)
        finally:
            engine.dispose()
        yield snapshot


@pytest.fixture
def engine_of():
    engines: list[sa.Engine] = []

    def make(url: str) -> sa.Engine:
        engines.append(store.engine_from_url(url))
        return engines[-1]

    yield make
    for engine in engines:
        engine.dispose()


def rows(engine: sa.Engine, skip: tuple[str, ...] = (),
         names: tuple[str, ...] = TABLES) -> dict[str, list[tuple]]:
    """Every row of the tables ``names`` (minus ``skip`` columns), in a stable order."""
    meta = sa.MetaData()
    out = {}
    with engine.connect() as conn:
        for name in names:
            table = sa.Table(name, meta, autoload_with=conn)
            cols = [c for c in table.c if c.name not in skip]
            out[name] = sorted((tuple(r) for r in conn.execute(sa.select(*cols))), key=repr)
    return out


def tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def schema_of(engine: sa.Engine) -> dict[str, dict[str, list]]:
    """Every results table's columns, keys, indexes and checks, as the database reports them."""
    inspector = sa.inspect(engine)
    out = {}
    for name in sorted(set(inspector.get_table_names()) - {revisions.VERSION_TABLE}):
        fks = [(fk["name"], fk["constrained_columns"], fk["referred_table"], fk["referred_columns"],
                fk["options"]) for fk in inspector.get_foreign_keys(name)]
        out[name] = {
            "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(name)],
            "primary_key": [inspector.get_pk_constraint(name)["constrained_columns"]],
            "foreign_keys": sorted(fks, key=repr),
            "unique": sorted(((u["name"], u["column_names"]) for u in
                              inspector.get_unique_constraints(name)), key=repr),
            "indexes": sorted(((i["name"], i["column_names"], i["unique"]) for i in
                               inspector.get_indexes(name)), key=repr),
            "checks": sorted(((c["name"], c["sqltext"]) for c in
                              inspector.get_check_constraints(name)), key=repr),
        }
    return out


def schema_diff(engine: sa.Engine, metadata: sa.MetaData = store.metadata) -> list:
    """What autogenerate would put in a new revision to make the database match ``metadata``."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts=revisions.context_options())
        return compare_metadata(context, metadata)


def _night(sha: str, day: object) -> tuple[str, str]:
    return sha, str(day)[:10]  # SQLite gives dates as text


def night_totals(engine: sa.Engine) -> dict[tuple[str, str], tuple]:
    """(model, night) → (images, ok, failed, detections, {class: detections}), as
    drop_totals and drop_class_totals hold them."""
    with engine.connect() as conn:
        per_class: dict[tuple[str, str], dict[str, int]] = {}
        for sha, day, name, n in conn.exec_driver_sql(
                "SELECT model_sha256, drop_date, class_name, detections FROM drop_class_totals"):
            per_class.setdefault(_night(sha, day), {})[name] = n
        nights = conn.exec_driver_sql(
            "SELECT model_sha256, drop_date, images, ok, failed, detections FROM drop_totals").all()
    assert set(per_class) <= {_night(sha, day) for sha, day, *_ in nights}
    return {_night(sha, day): (n, ok, failed, dets, per_class.get(_night(sha, day), {}))
            for sha, day, n, ok, failed, dets in nights}


def truth_totals(engine: sa.Engine) -> dict[tuple[str, str], tuple]:
    """What night_totals should give, counted here from images and detections."""
    with engine.connect() as conn:
        per_class: dict[tuple[str, str], dict[str, int]] = {}
        for sha, day, name, n in conn.exec_driver_sql(
                "SELECT i.model_sha256, i.drop_date, d.class_name, count(*) FROM detections d "
                "JOIN images i ON i.id = d.image_id GROUP BY i.model_sha256, i.drop_date, d.class_name"):
            per_class.setdefault(_night(sha, day), {})[name] = n
        nights = conn.exec_driver_sql(
            "SELECT model_sha256, drop_date, count(*), sum(CASE WHEN status = 'ok' THEN 1 ELSE 0 END), "
            "sum(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) FROM images "
            "GROUP BY model_sha256, drop_date").all()
    out = {}
    for sha, day, n, ok, failed in nights:
        classes = per_class.get(_night(sha, day), {})
        out[_night(sha, day)] = (n, ok, failed, sum(classes.values()), classes)
    return out


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
        release_url, engine_of, tmp_path, schema_0001):
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
    assert schema_of(engine) == schema_0001  # the release's schema is 0001's

    assert store.migrate(engine) == HEAD
    assert schema_diff(engine) == []
    assert rows(engine, skip=ADDED_COLS) == before
    # The release's run settings name no folders: unknown, so NULL.
    assert {row[-4:-2] for row in rows(engine)["images"]} == {(None, None)}
    assert night_totals(engine) == truth_totals(engine) != {}
    assert tables(engine) == {*store.metadata.tables, revisions.VERSION_TABLE}
    assert store.migrate(engine) == HEAD and rows(engine, skip=ADDED_COLS) == before

    # Today's load of the same staging file writes the rows the release wrote (same ids).
    released = rows(engine, skip=TIME_COLS)
    totals = night_totals(engine)
    report = reload_release_staging(engine, tmp_path)
    assert (report.images, report.detections) == (13, 18)
    assert rows(engine, skip=TIME_COLS) == released
    assert night_totals(engine) == totals
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
    assert night_totals(engine) == truth_totals(engine)  # the load recounted the night: 14 images
    assert next(iter(night_totals(engine).values()))[0] == 14


def test_a_schema_version_newer_than_the_release_is_refused(release_url, engine_of):
    engine = engine_of(release_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE image_etl_schema_version SET version = 2"))
    before = rows(engine)
    with pytest.raises(StoreError, match="schema version 2 .* newer than this code knows"):
        store.migrate(engine)
    assert revisions.LEGACY_VERSION_TABLE in tables(engine) and revisions.VERSION_TABLE not in tables(engine)
    assert rows(engine) == before


# --- revision 0002: each image's folders, the night totals -------------------------------------

SHA = "c3" * 32
D1, D2, D3 = dt.date(2026, 11, 18), dt.date(2026, 11, 19), dt.date(2026, 11, 20)
# run_key → (night, its model, runs.settings as stored), and the images each run wrote.
RUNS_0001 = {
    "a": (D1, SHA, json.dumps({"drop_dir": '/drops/d1 naïve "q"', "output_dir": "/out/d1"})),
    "b": (D3, SHA, json.dumps({"drop_dir": "/drops/d3"})),  # re-run for D3: its D2 rows came from elsewhere
    "c": (D3, SHA, "not json"),
    "d": (D2, SHA, json.dumps({"drop_dir": 7, "output_dir": "/out/d"})),  # not a folder name
    "e": (D2, SHA, json.dumps({"output_dir": "/out/e"})),  # no drop folder: nothing is known
    "f": (D2, SHA, json.dumps(["/drops/f"])),
    "g": (D2, None, json.dumps({"drop_dir": "/drops/g"})),  # no model: not this night's run
    "h": (D2, SHA, json.dumps({"drop_dir": "", "output_dir": "/out/h"})),
}
IMAGES_0001 = [  # id, night, run_key, status
    (1, D1, "a", "ok"), (2, D1, "a", "failed"), (3, D2, "b", "ok"), (4, D3, "b", "ok"),
    (5, D3, "c", "ok"), (6, D2, "d", "ok"), (7, D2, "e", "ok"), (8, D2, "f", "ok"),
    (9, D2, "g", "ok"), (10, D2, "h", "ok"), (11, D3, "gone", "failed"),
]
DETECTIONS_0001 = [(1, 0, "spot"), (1, 1, "spot"), (1, 2, "patch"), (3, 0, "patch"),
                   (4, 0, "scratch"), (4, 1, "patch"), (9, 0, "spot")]


def fill_0001(engine: sa.Engine) -> None:
    """Rows as a 0001 database may hold them, written with plain SQL (not today's load)."""
    now = dt.datetime(2026, 11, 21, tzinfo=dt.UTC)
    with store.write_transaction(engine) as conn:
        conn.execute(sa.text("INSERT INTO models VALUES (:s, 'm.pt', '/m.pt', :n, :t)"),
                     {"s": SHA, "n": json.dumps({"0": "spot", "1": "patch", "2": "scratch"}), "t": now})
        for key, (day, sha, settings) in RUNS_0001.items():
            conn.execute(sa.text(
                "INSERT INTO runs (run_key, dag_id, run_id, drop_date, model_sha256, settings, "
                "loaded_at, images, ok, failed, detections, infer_seconds) VALUES "
                "(:k, 'd', :k, :day, :s, :settings, :t, 0, 0, 0, 0, 0)"),
                {"k": key, "day": day, "s": sha, "t": now, "settings": settings})
        for image_id, day, run_key, status in IMAGES_0001:
            conn.execute(sa.text(
                "INSERT INTO images (id, model_sha256, drop_date, rel_path, run_key, status, "
                "processed_at) VALUES (:i, :s, :day, :p, :k, :st, :t)"),
                {"i": image_id, "s": SHA, "day": day, "p": f"img{image_id}.jpg", "k": run_key,
                 "st": status, "t": now})
        for image_id, k, name in DETECTIONS_0001:
            conn.execute(sa.text(
                "INSERT INTO detections VALUES (:i, :k, 0, :n, 0.5, 1, 2, 3, 4, .1, .1, .1, .1)"),
                {"i": image_id, "k": k, "n": name})


def folders(engine: sa.Engine) -> dict[int, tuple[str | None, str | None]]:
    with engine.connect() as conn:
        return {i: (d, o) for i, d, o in conn.exec_driver_sql(
            "SELECT id, drop_dir, output_dir FROM images")}


def test_0002_fills_each_images_folders_and_the_night_totals_from_a_0001_database(
        empty_url, engine_of):
    """Set-based backfills: an image gets its run's folders only where the run row still
    describes the image's night and names a drop folder; every night gets its totals."""
    engine = engine_of(empty_url)
    assert store.migrate(engine, "0001") == "0001"
    fill_0001(engine)
    before = rows(engine)

    assert store.migrate(engine) == HEAD
    assert schema_diff(engine) == []
    assert rows(engine, skip=ADDED_COLS) == before  # every row, every value
    d1 = ('/drops/d1 naïve "q"', "/out/d1")
    assert folders(engine) == {1: d1, 2: d1, 4: ("/drops/d3", None),
                               **{i: (None, None) for i in (3, 5, 6, 7, 8, 9, 10, 11)}}
    assert night_totals(engine) == truth_totals(engine) == {
        (SHA, D1.isoformat()): (2, 1, 1, 3, {"spot": 2, "patch": 1}),
        (SHA, D2.isoformat()): (6, 6, 0, 2, {"patch": 1, "spot": 1}),
        (SHA, D3.isoformat()): (3, 2, 1, 2, {"scratch": 1, "patch": 1}),
    }


def load_night(engine: sa.Engine, tmp_path: Path, run_key: str, day: dt.date) -> None:
    """The release's staging file loaded by today's code for ``day``, by run ``run_key``."""
    staged = shutil.copyfile(RELEASE / "staged.jsonl", tmp_path / f"{day}.jsonl")
    run = store.RunInfo(run_key=run_key, dag_id="nightly_detections", run_id=run_key, drop_date=day,
                        settings={"drop_dir": f"/drops/{day}", "output_dir": f"/out/{day}"})
    store.load_staged(engine, [staged], run, names={0: "person", 3: "car"})


def rows_without(dumped: dict[str, list[tuple]], cols: tuple[str, ...]) -> dict[str, list[tuple]]:
    """``dumped`` (rows()) less the images columns ``cols`` (its last ones), as rows() orders."""
    return {name: sorted((r[:-len(cols)] for r in got), key=repr) if name == "images" else got
            for name, got in dumped.items()}


def test_0002_downgrades_to_0001s_schema_with_every_row_and_upgrades_again(
        empty_url, engine_of, tmp_path, schema_0001):
    """The downgrade drops what 0002 added (SQLite rebuilds ``images``: no detection may
    cascade away); the next upgrade refills the folders wherever the runs still tell them."""
    engine = engine_of(empty_url)
    assert store.migrate(engine) == HEAD
    load_night(engine, tmp_path, "run", D1)
    load_night(engine, tmp_path, "other", D2)
    load_night(engine, tmp_path, "run", D3)  # the same run key re-run: runs says D3 now
    at_head = rows(engine)
    totals = night_totals(engine)
    assert len(at_head["images"]) == 39 and len(at_head["detections"]) == 54 and len(totals) == 3
    assert {row[-4:-2] for row in at_head["images"]} == {(f"/drops/{d}", f"/out/{d}") for d in (D1, D2, D3)}

    assert store.downgrade(engine, "0001") == "0001" == store.current_revision(engine)
    assert schema_of(engine) == schema_0001
    assert rows(engine) == rows_without(at_head, ADDED_COLS)
    with engine.connect() as conn:  # a pooled connection: foreign keys are on again
        if engine.dialect.name == "sqlite":
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1

    assert store.migrate(engine) == HEAD
    assert schema_diff(engine) == []
    assert rows(engine, skip=ADDED_COLS) == rows_without(at_head, ADDED_COLS)
    assert night_totals(engine) == totals
    # D1's folders were only in its image rows: the run row now describes D3.
    with engine.connect() as conn:
        by_night = {(str(day)[:10], d, o) for day, d, o in conn.exec_driver_sql(
            "SELECT drop_date, drop_dir, output_dir FROM images")}
    assert by_night == {(D1.isoformat(), None, None), (D2.isoformat(), f"/drops/{D2}", f"/out/{D2}"),
                        (D3.isoformat(), f"/drops/{D3}", f"/out/{D3}")}


# --- revision 0003: result identity, the night's files ----------------------------------------

@pytest.fixture
def schema_0002(dialect, tmp_path) -> Iterator[dict[str, dict[str, list]]]:
    """The schema revision 0002 makes (schema_of), on an empty database of the test's dialect."""
    urls = [f"sqlite:///{tmp_path / 'at_0002.sqlite'}"] if dialect == "sqlite" else postgres_url()
    for url in urls:
        engine = store.engine_from_url(url)
        try:
            assert store.migrate(engine, "0002") == "0002"
            snapshot = schema_of(engine)
        finally:
            engine.dispose()
        yield snapshot


def test_0003_records_result_settings_and_downgrades_to_0002_with_every_row(
        empty_url, engine_of, tmp_path, schema_0002):
    """At head each image row names the result settings that made it (and whether a later
    night caught it up); the downgrade gives back 0002's schema with every other value (SQLite
    rebuilds ``images``: no detection may cascade away); upgrading again leaves the settings
    unknown (NULL), never guessed."""
    engine = engine_of(empty_url)
    assert store.migrate(engine) == HEAD
    staged = shutil.copyfile(RELEASE / "staged.jsonl", tmp_path / "d1.jsonl")
    for day, key, late in ((D1, "k" * 16, False), (D2, "j" * 16, True)):
        store.load_staged(engine, [staged], store.RunInfo(
            run_key="run", dag_id="d", run_id="run", drop_date=day, settings={},
            result_key=key, result_settings={"conf": 0.1 if late else 0.2}, caught_up=late))
    store.record_night_files(engine, "a1" * 32, D1, "run", {
        "listed": 3, "unsettled": 1, "unsettled_names": ["x.jpg"], "skipped_links": 0,
        "skipped_unknown": 2, "skipped_hidden": 1})
    at_head = rows(engine)
    keys = {(str(r[2])[:10], r[-2], bool(r[-1])) for r in at_head["images"]}
    assert keys == {(D1.isoformat(), "k" * 16, False), (D2.isoformat(), "j" * 16, True)}
    assert len(rows(engine, names=NIGHT_FILES)["result_settings"]) == 2

    assert store.downgrade(engine, "0002") == "0002" == store.current_revision(engine)
    assert schema_of(engine) == schema_0002
    assert tables(engine).isdisjoint(NIGHT_FILES)
    assert rows(engine) == rows_without(at_head, IDENTITY_COLS)

    assert store.migrate(engine) == HEAD
    assert schema_diff(engine) == []
    after = rows(engine)
    assert rows_without(after, IDENTITY_COLS) == rows_without(at_head, IDENTITY_COLS)
    assert {(r[-2], bool(r[-1])) for r in after["images"]} == {(None, False)}


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
