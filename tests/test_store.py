"""The results store against real databases: a SQLite file and a real PostgreSQL server.

Every store test runs on both. On PostgreSQL each test gets its own schema (via
``search_path`` in the URL) inside the session's fresh database, so tests start empty.
Staging files are written with the real StagingWriter.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from image_etl import staging, store
from image_etl.staging import StagingWriter, image_record, read_staging
from image_etl.store import (
    LoadReport,
    RunInfo,
    StoreError,
    drop_summary,
    engine_from_url,
    load_staged,
    loaded_rel_paths,
    migrate,
    redact_url,
    upsert_model,
)
from image_etl.yolo_txt import format_txt

from .pg import pg_url  # noqa: F401  (session fixture: a fresh PostgreSQL database)

SHA_A = "a1" * 32
SHA_B = "b2" * 32
NAMES = {0: "person", 1: "car", 2: 'traffic "light", 신호등'}
D1 = dt.date(2026, 11, 20)
D2 = dt.date(2026, 11, 21)
TIME_COLS = ("loaded_at", "processed_at", "first_seen", "updated_at")
VERSION_TABLE = sa.table("image_etl_alembic_version", sa.column("version_num"))

AWKWARD = [
    "with space.jpg",
    "  leading and trailing  .jpg",
    "it's.jpg",
    'say "cheese".jpg',
    "tab\there.jpg",
    "new\nline.jpg",
    "carriage\r\nreturn.jpg",
    "comma,separated,name.jpg",
    "back\\slash\\N.jpg",
    "\\N",
    "\\.",
    "a\n\\.\nb.jpg",
    '""',
    "NULL",
    "sub dir/naïve café/東京タワー 🗼.jpg",
    "mixed '\" ,\t\\ \n end.jpg",
]


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture
def engine(db_url):
    eng = engine_from_url(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def db(engine):
    assert migrate(engine) == store.head_revision()
    return engine


# --- helpers --------------------------------------------------------------------------------

def make_dets(rng: np.random.Generator, n: int, w: int = 640, h: int = 480) -> np.ndarray:
    """``n`` detection rows in DET_FIELDS order, full-precision floats."""
    if n == 0:
        return np.zeros((0, 10))
    cls = rng.integers(0, len(NAMES), n).astype(float)
    conf = rng.uniform(0.25, 1.0, n)
    x1, y1 = rng.uniform(0, w - 50, n), rng.uniform(0, h - 50, n)
    x2, y2 = x1 + rng.uniform(1, 50, n), y1 + rng.uniform(1, 50, n)
    xc, yc = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h
    bw, bh = (x2 - x1) / w, (y2 - y1) / h
    return np.stack([cls, conf, x1, y1, x2, y2, xc, yc, bw, bh], axis=1)


def ok(rel: str, dets: np.ndarray, bytes_: int = 12345) -> dict:
    return image_record(rel, status="ok", bytes_=bytes_, width=640, height=480, error=None,
                        dets=dets)


def failed(rel: str, error: str | None = "DecodeError: truncated JPEG") -> dict:
    return image_record(rel, status="failed", bytes_=77, width=0, height=0, error=error, dets=None)


def stage(path: Path, records: list[dict], sha: str = SHA_A) -> Path:
    """A staging file as a worker shard writes it."""
    writer = StagingWriter(path, f"fp-{sha[:8]}", {"model_sha256": sha,
                                                   "model_path": "/models/demo-yolo11n.pt"})
    assert writer.resume() == {}
    for record in records:
        writer.append(record)
    writer.close()
    return path


def run_info(key: str = "nightly_detections/scheduled__2026-11-20T02:00:00+00:00",
             date: dt.date = D1, infer_seconds: float = 4.0) -> RunInfo:
    dag_id, run_id = key.split("/", 1)
    return RunInfo(run_key=key, dag_id=dag_id, run_id=run_id, drop_date=date,
                   settings={"conf": 0.25, "imgsz": 640}, infer_seconds=infer_seconds)


def dump(engine, skip: tuple[str, ...] = ()) -> dict[str, list[tuple]]:
    """Every row of every table (minus ``skip`` columns), in a stable order."""
    out = {}
    with engine.connect() as conn:
        for table in (*store.metadata.sorted_tables, VERSION_TABLE):
            cols = [c for c in table.c if c.name not in skip]
            out[table.name] = sorted((tuple(r) for r in conn.execute(sa.select(*cols))), key=repr)
    return out


def stored_dets(engine, date: dt.date = D1, sha: str = SHA_A) -> dict[str, list[tuple]]:
    """rel_path → its detections (det_index order), for one model and date (ok images only)."""
    i, d = store.images, store.detections
    query = (sa.select(i.c.rel_path, d.c.det_index, d.c.class_id, d.c.class_name, d.c.confidence,
                       d.c.x1, d.c.y1, d.c.x2, d.c.y2, d.c.xc, d.c.yc, d.c.w, d.c.h)
             .select_from(i.outerjoin(d, d.c.image_id == i.c.id))
             .where(i.c.model_sha256 == sha, i.c.drop_date == date, i.c.status == "ok")
             .order_by(i.c.rel_path, d.c.det_index))
    out: dict[str, list[tuple]] = {}
    with engine.connect() as conn:
        for row in conn.execute(query):
            rows = out.setdefault(row[0], [])
            if row[1] is not None:
                rows.append(tuple(row[1:]))
    return out


def expected_dets(records: list[dict], names: dict[int, str] = NAMES) -> dict[str, list[tuple]]:
    out = {}
    for r in records:
        if r["status"] == "ok":
            out[r["rel_path"]] = [(i, int(d[0]), names[int(d[0])], *d[1:])
                                  for i, d in enumerate(r["detections"])]
    return out


def image_ids(engine, date: dt.date = D1) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(store.images.c.rel_path, store.images.c.id)
                                 .where(store.images.c.drop_date == date)).all())


def count(engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def two_shards(tmp_path: Path, seed: int = 1, prefix: str = "") -> tuple[list[Path], list[dict]]:
    rng = np.random.default_rng(seed)
    a = [ok(f"{prefix}cam1/img_{k:03d}.jpg", make_dets(rng, k % 5)) for k in range(8)]
    a.append(failed(f"{prefix}cam1/broken.jpg"))
    b = [ok(f"{prefix}cam2/img_{k:03d}.jpg", make_dets(rng, 3)) for k in range(5)]
    tag = uuid.uuid4().hex[:6]
    files = [stage(tmp_path / f"shard0-{tag}.jsonl", a), stage(tmp_path / f"shard1-{tag}.jsonl", b)]
    return files, a + b


# --- engine and migrations --------------------------------------------------------------------

def test_redact_url_hides_password():
    url = "postgresql+psycopg2://etl:s3cr%40t%3Apw@db.example:5432/results"
    redacted = redact_url(url)
    assert "s3cr" not in redacted and "***" in redacted
    assert redacted.startswith("postgresql+psycopg2://etl:") and "db.example:5432/results" in redacted
    assert "hunter2" not in redact_url("postgresql://etl@db/results?password=hunter2&sslmode=require")
    assert "sslmode=require" in redact_url("postgresql://etl@db/results?password=hunter2&sslmode=require")
    assert "hunter2" not in redact_url("not a url://user:hunter2@host/db")
    assert redact_url("sqlite:////var/lib/etl/results.sqlite") == "sqlite:////var/lib/etl/results.sqlite"


def test_engine_from_url_rejects_unknown_database_without_leaking_password():
    with pytest.raises(StoreError) as err:
        engine_from_url("mysql://etl:hunter2@db/results")
    assert "hunter2" not in str(err.value) and "mysql" in str(err.value)


def test_sqlite_engine_creates_folder_and_sets_pragmas(tmp_path):
    path = tmp_path / "deep" / "er" / "results.sqlite"
    eng = engine_from_url(f"sqlite:///{path}")
    try:
        with eng.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == store.SQLITE_BUSY_TIMEOUT_MS
        assert path.is_file()
        # SQLAlchemy emits BEGIN itself, so DDL is transactional: a rolled-back CREATE is gone.
        with pytest.raises(RuntimeError), eng.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x int)")
            raise RuntimeError("roll back")
        assert not sa.inspect(eng).has_table("t")
    finally:
        eng.dispose()


def test_migrate_twice_gives_same_version_and_tables(engine):
    head = store.head_revision()
    assert migrate(engine) == head
    assert migrate(engine) == head
    tables = set(sa.inspect(engine).get_table_names())
    assert tables == {VERSION_TABLE.name, *store.metadata.tables}
    assert dump(engine)[VERSION_TABLE.name] == [(head,)]
    uniques = sa.inspect(engine).get_unique_constraints("images")
    assert any(u["column_names"] == ["model_sha256", "drop_date", "rel_path"] for u in uniques)


def test_migrate_concurrently_applies_each_step_once(db_url):
    engines = [engine_from_url(db_url) for _ in range(3)]
    barrier = threading.Barrier(len(engines))
    results: list[int | BaseException] = []

    def worker(eng):
        barrier.wait()
        try:
            results.append(migrate(eng))
        except BaseException as e:  # noqa: B036 - reported by the assert below
            results.append(e)

    threads = [threading.Thread(target=worker, args=(e,)) for e in engines]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        head = store.head_revision()
        assert results == [head] * 3
        assert dump(engines[0])[VERSION_TABLE.name] == [(head,)]
    finally:
        for e in engines:
            e.dispose()


def test_migrate_refuses_a_newer_schema(db):
    with db.begin() as conn:
        conn.execute(sa.update(VERSION_TABLE).values(version_num="9999"))
    with pytest.raises(StoreError, match="newer"):
        migrate(db)


def test_upsert_model_keeps_first_seen_and_updates_names(db):
    upsert_model(db, SHA_A, "/models/v1.pt", {0: "person"})
    first = dump(db)["models"]
    upsert_model(db, SHA_A, "/models/renamed.pt", {0: "person", 1: "car"})
    upsert_model(db, SHA_A, "/models/renamed.pt", None)  # None keeps the stored names
    (row,) = dump(db)["models"]
    assert row[0] == SHA_A and row[1] == "renamed.pt" and row[2] == "/models/renamed.pt"
    with db.connect() as conn:
        assert store.model_names(conn, SHA_A) == {0: "person", 1: "car"}
    assert row[4] == first[0][4]  # first_seen
    with pytest.raises(ValueError, match="sha256"):
        upsert_model(db, "not-a-sha", "/m.pt", {})


# --- loads ------------------------------------------------------------------------------------

def test_load_then_reload_same_files_is_identical(db, tmp_path):
    files, records = two_shards(tmp_path)
    report = load_staged(db, files, run_info(), NAMES)
    assert isinstance(report, LoadReport)
    assert (report.images, report.ok, report.failed) == (14, 13, 1)
    n_dets = sum(len(r["detections"]) for r in records)
    assert report.detections == n_dets == count(db, store.detections)
    assert stored_dets(db) == expected_dets(records)  # exact floats, class names, order

    first = dump(db, skip=TIME_COLS)
    again = load_staged(db, files, run_info(), NAMES)
    assert dump(db, skip=TIME_COLS) == first  # same ids, no duplicates, same everything
    assert (again.images, again.detections) == (report.images, report.detections)
    assert count(db, store.images) == 14


def test_reload_with_changed_detections_replaces_them_and_keeps_ids(db, tmp_path):
    files, records = two_shards(tmp_path)
    load_staged(db, files, run_info(), NAMES)
    ids_before = image_ids(db)

    rng = np.random.default_rng(99)
    changed = [ok(r["rel_path"], make_dets(rng, (k * 3) % 7)) for k, r in enumerate(records)
               if r["status"] == "ok"]
    changed[0] = failed(changed[0]["rel_path"], "OSError: vanished")  # ok → failed
    changed.append(ok("cam1/broken.jpg", make_dets(rng, 2)))  # failed → ok
    new_files = [stage(tmp_path / "v2.jsonl", changed)]
    report = load_staged(db, new_files, run_info("nightly_detections/manual__rerun"), NAMES)

    assert image_ids(db) == ids_before
    assert stored_dets(db) == expected_dets(changed)
    assert count(db, store.detections) == report.detections == sum(
        len(r["detections"]) for r in changed if r["status"] == "ok")
    with db.connect() as conn:
        keys = set(conn.execute(sa.select(store.images.c.run_key)).scalars())
        assert keys == {"nightly_detections/manual__rerun"}
        assert conn.execute(sa.select(sa.func.count()).select_from(store.runs)).scalar_one() == 2


def test_another_drop_date_adds_only_its_rows(db, tmp_path):
    files, records = two_shards(tmp_path)
    load_staged(db, files, run_info(), NAMES)
    d1_dets, d1_ids = stored_dets(db, D1), image_ids(db, D1)

    rng = np.random.default_rng(5)
    d2_records = [ok(r["rel_path"], make_dets(rng, 4)) for r in records[:6]]
    load_staged(db, [stage(tmp_path / "d2.jsonl", d2_records)],
                run_info("nightly_detections/scheduled__2026-11-21", D2), NAMES)

    assert stored_dets(db, D1) == d1_dets and image_ids(db, D1) == d1_ids
    assert stored_dets(db, D2) == expected_dets(d2_records)
    assert count(db, store.images) == len(records) + len(d2_records)
    assert drop_summary(db, D2)["detections"] == 6 * 4


def test_failed_image_has_error_text_and_no_detections(db, tmp_path):
    rng = np.random.default_rng(3)
    weird_failed = failed("cam9/x.jpg", "ValueError: can't decode\n  at byte 12, 'quote' \"dq\"")
    with_dets = failed("cam9/y.jpg")
    with_dets["detections"] = make_dets(rng, 3).tolist()  # a failed image never keeps any
    records = [weird_failed, with_dets, failed("cam9/empty.jpg", ""), failed("cam9/none.jpg", None),
               ok("cam9/fine.jpg", make_dets(rng, 2))]
    report = load_staged(db, [stage(tmp_path / "s.jsonl", records)], run_info(), NAMES)
    assert (report.failed, report.ok, report.detections) == (4, 1, 2)

    i, d = store.images, store.detections
    with db.connect() as conn:
        rows = {r.rel_path: (r.status, r.error)
                for r in conn.execute(sa.select(i.c.rel_path, i.c.status, i.c.error))}
        dets_of_failed = conn.execute(
            sa.select(sa.func.count()).select_from(d.join(i, i.c.id == d.c.image_id))
            .where(i.c.status == "failed")).scalar_one()
    assert rows["cam9/x.jpg"] == ("failed", weird_failed["error"])
    assert rows["cam9/empty.jpg"] == ("failed", "")  # '' and NULL stay apart
    assert rows["cam9/none.jpg"] == ("failed", None)
    assert rows["cam9/fine.jpg"] == ("ok", None)
    assert dets_of_failed == 0
    assert loaded_rel_paths(db, SHA_A, D1) == {"cam9/fine.jpg"}


@pytest.mark.slow
def test_large_load_round_trips(db, tmp_path):
    rng = np.random.default_rng(2026)
    records = [ok(f"big/{k // 100:02d}/img_{k:04d}.jpg", make_dets(rng, 100), bytes_=10_000 + k)
               for k in range(1000)]
    files = [stage(tmp_path / f"big{s}.jsonl", records[s::4]) for s in range(4)]
    report = load_staged(db, files, run_info(), NAMES)
    assert (report.images, report.detections) == (1000, 100_000)

    all_dets = np.concatenate([np.asarray(r["detections"]) for r in records])
    d = store.detections
    with db.connect() as conn:
        n, s_cls, s_conf, s_x1, s_y2, s_w = conn.execute(sa.select(
            sa.func.count(), sa.func.sum(d.c.class_id), sa.func.sum(d.c.confidence),
            sa.func.sum(d.c.x1), sa.func.sum(d.c.y2), sa.func.sum(d.c.w))).one()
        s_bytes = conn.execute(sa.select(sa.func.sum(store.images.c.bytes))).scalar_one()
    assert n == 100_000
    assert s_cls == int(all_dets[:, 0].sum())
    assert s_conf == pytest.approx(all_dets[:, 1].sum(), rel=1e-12)
    assert s_x1 == pytest.approx(all_dets[:, 2].sum(), rel=1e-12)
    assert s_y2 == pytest.approx(all_dets[:, 5].sum(), rel=1e-12)
    assert s_w == pytest.approx(all_dets[:, 8].sum(), rel=1e-12)
    assert s_bytes == sum(r["bytes"] for r in records)
    assert stored_dets(db) == expected_dets(records)  # every value, bit for bit


def test_awkward_file_names_round_trip_exactly(db, tmp_path):
    rng = np.random.default_rng(11)
    records = [ok(name, make_dets(rng, 2)) for name in AWKWARD]
    records.append(failed("failed, \"odd\"\tname\n.jpg", 'error with "quotes", \\N and\ttabs'))
    load_staged(db, [stage(tmp_path / "weird name, with 'quotes'.jsonl", records)], run_info(), NAMES)

    assert loaded_rel_paths(db, SHA_A, D1) == set(AWKWARD)
    assert stored_dets(db) == expected_dets(records)
    with db.connect() as conn:
        stored = conn.execute(sa.select(store.images.c.rel_path, store.images.c.error)
                              .where(store.images.c.status == "failed")).one()
        classes = set(conn.execute(sa.select(store.detections.c.class_name)).scalars())
    assert tuple(stored) == (records[-1]["rel_path"], records[-1]["error"])
    assert classes <= set(NAMES.values()) and classes


def _bad_second_half(path: Path, good: list[dict], kind: str) -> None:
    """Half good records, then one bad one (how depends on ``kind``), then more good ones."""
    half = len(good) // 2
    bad = ok("bad/record.jpg", make_dets(np.random.default_rng(0), 3))
    if kind == "non_numeric_confidence":
        bad["detections"][1][1] = "0.9x"
    elif kind == "confidence_out_of_range":  # only the database's CHECK catches this one
        bad["detections"][2][1] = 1.5
    elif kind == "bytes_overflow":  # too big for BIGINT: the driver or the server refuses
        bad["bytes"] = 2**70
    stage(path, good[:half] + [bad] + good[half:])
    if kind == "corrupt_line":  # garbage in the middle: not a torn last line
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        lines.insert(len(lines) // 2, '{"rel_path": "half a rec\n')
        path.write_text("".join(lines), encoding="utf-8")


@pytest.mark.parametrize("kind", ["non_numeric_confidence", "confidence_out_of_range",
                                  "bytes_overflow", "corrupt_line", "other_model"])
def test_failing_load_leaves_db_exactly_as_before(db, tmp_path, kind):
    files, records = two_shards(tmp_path)
    load_staged(db, files, run_info(), NAMES)
    before = dump(db)  # everything, timestamps included

    rng = np.random.default_rng(8)
    changed = [ok(r["rel_path"], make_dets(rng, 6)) for r in records] + [
        ok(f"new/{k}.jpg", make_dets(rng, 2)) for k in range(10)]
    good_file = stage(tmp_path / "retry0.jsonl", changed[:12])
    second = tmp_path / "retry1.jsonl"
    if kind == "other_model":
        stage(second, changed[12:], sha=SHA_B)
    else:
        _bad_second_half(second, changed[12:], kind)
    rerun = run_info("nightly_detections/manual__retry")

    with pytest.raises(Exception) as err:
        load_staged(db, [good_file, second], rerun, NAMES)
    if kind in ("other_model", "corrupt_line", "non_numeric_confidence"):
        assert isinstance(err.value, ValueError) and str(second) in str(err.value)
    if kind == "other_model":
        assert str(good_file) in str(err.value)
    assert dump(db) == before
    assert loaded_rel_paths(db, SHA_A, D1) == {r["rel_path"] for r in records if r["status"] == "ok"}

    fixed = stage(tmp_path / "retry1-fixed.jsonl", changed[12:])
    report = load_staged(db, [good_file, fixed], rerun, NAMES)
    assert report.images == len(changed) and report.failed == 0
    assert stored_dets(db) == expected_dets(changed)
    assert count(db, store.detections) == sum(len(r["detections"]) for r in changed)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("conf", "0.5", "conf must be a number"),  # numeric text is not a number
    ("conf", True, "conf must be a number"),
    ("x1", float("nan"), "x1 must be finite"),
    ("cls", 1.5, "cls must be a class index"),
    ("cls", -1, "cls must be a class index"),
    ("row", [0, 0.5, 1, 2, 3], "expected 10 numbers"),
    ("status", "maybe", "status must be 'ok' or 'failed'"),
    ("bytes", "12", "bytes must be a whole number"),
    ("rel_path", "", "bad rel_path"),
    ("rel_path", 5, "neither a header nor an image record"),  # as staging.read_staging says
])
def test_bad_records_are_refused_with_a_precise_message(db, tmp_path, field, value, message):
    rng = np.random.default_rng(13)
    bad = ok("bad.jpg", make_dets(rng, 3))
    if field in ("status", "bytes", "rel_path"):
        bad[field] = value
    elif field == "row":
        bad["detections"][1] = value
    else:
        bad["detections"][1][{"cls": 0, "conf": 1, "x1": 2}[field]] = value
    path = stage(tmp_path / "bad.jsonl", [ok("good.jpg", make_dets(rng, 2)), bad])
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        load_staged(db, [path], run_info(), NAMES)
    assert str(path) in str(err.value)
    assert count(db, store.images) == 0 and count(db, store.models) == 0


def test_torn_last_line_is_ignored_but_header_is_required(db, tmp_path):
    rng = np.random.default_rng(4)
    path = stage(tmp_path / "torn.jsonl", [ok("a.jpg", make_dets(rng, 1)), ok("b.jpg", make_dets(rng, 1))])
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"rel_path": "c.jpg", "status": "o')  # a killed writer's last line
    report = load_staged(db, [path], run_info(), NAMES)
    assert report.images == 2 and loaded_rel_paths(db, SHA_A, D1) == {"a.jpg", "b.jpg"}

    headless = tmp_path / "headless.jsonl"
    headless.write_text(path.read_text(encoding="utf-8").split("\n", 1)[1], encoding="utf-8")
    before = dump(db)
    with pytest.raises(ValueError, match="header"):
        load_staged(db, [headless], run_info(), NAMES)
    assert dump(db) == before


# --- staging files not written by StagingWriter ---------------------------------------------------
# A worker's lines are checked as msgspec decodes them into the worker's record shape; anything
# else must load exactly as json.loads reads it, or fail as it would.

def write_staging(path: Path, lines: list[str], sha: str = SHA_A, newline: str = "\n") -> Path:
    """A staging file from raw record lines (after the usual header line)."""
    header = json.dumps({"kind": "header", "version": 1, "fingerprint": "fp-hand",
                         "model_sha256": sha, "model_path": "/models/demo-yolo11n.pt"})
    path.write_bytes("".join(line + newline for line in [header, *lines]).encode())
    return path


def det_line(rel: str, dets: str, **fields) -> str:
    """A worker-shaped record line whose detections are the raw JSON text ``dets``."""
    head = {"rel_path": rel, "status": "ok", "bytes": 1, "width": 640, "height": 480, "error": None}
    head.update(fields)
    return json.dumps(head)[:-1] + f', "detections": {dets}}}'


ROW = "1.0, 0.5, 10.25, 20.5, 30.0, 40.0, 0.03125, 0.0625, 0.03, 0.04"


def test_staging_lines_in_other_json_spellings_load_as_json_reads_them(db, tmp_path):
    rng = np.random.default_rng(21)
    base = [ok(f"spell/{k}.jpg", make_dets(rng, 3)) for k in range(3)]
    compact = [json.dumps(r, separators=(",", ":")) for r in base]
    files = [
        write_staging(tmp_path / "compact.jsonl", compact),
        write_staging(tmp_path / "crlf.jsonl", [json.dumps(ok("crlf/0.jpg", make_dets(rng, 2)))],
                      newline="\r\n"),
        write_staging(tmp_path / "numbers.jsonl", [
            det_line("num/ints.jpg", "[[2, 1, 10, 20, 30, 40, 0, 1, 0, 1]]"),
            det_line("num/exponents.jpg",
                     "[[0.0, 0.5, 1e-05, 2.5e+20, 1E5, 1e-07, 3.5E-2, 0.1, 1e0, 7e+01]]"),
            det_line("num/zeros.jpg", "[[0.0, 0.5, -0.0, 0.0, -0, 0, 0e0, -0e0, 0.0, 0.0]]"),
            det_line("num/long.jpg", "[[1.0, 0.30000000000000004, 123456789012345678901234567890, "
                                     "0.1000000000000000055511151231257827021181583404541015625, "
                                     "1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]")]),
        write_staging(tmp_path / "tiny.jsonl", [  # three-digit exponents: float8in's range ends
            det_line("tiny/denormal.jpg", "[[0.0, 0.5, 5e-324, 2.2250738585072014e-308, "
                                          "1e-400, 1.7976931348623157e+308, 0.0, 0.0, 0.0, 0.0]]")]),
        write_staging(tmp_path / "other_order.jsonl", [  # detections not last, spaces
            '{ "detections" : [[ 0 , 0.75 , 1 , 2 , 3 , 4 , 0.5 , 0.5 , 0.1 , 0.1 ]] ,'
            ' "rel_path" : "order/a.jpg" , "status" : "ok" , "error" : null }',
            '{"rel_path": "order/b.jpg", "status": "ok", "detections": [[' + ROW + ']],'
            ' "error": null, "extra": "ignored"}']),
        write_staging(tmp_path / "superseded.jsonl", [  # later lines win, earlier ones are not checked
            det_line("sup/a.jpg", "[[1.5, NaN, 1, 2, 3, 4, 5, 6, 7, 8]]"),
            det_line("sup/b.jpg", "[[0.0, 0.5, 1, 2, 3, 4, 5, 6, 7, 8]]", status="failed",
                     error="Boom"),
            det_line("sup/a.jpg", f"[[{ROW}]]"),
            json.dumps({"kind": "header", "model_sha256": SHA_A}),  # a repeated header line
            det_line("sup/c.jpg", f"[[{ROW}], [{ROW}]]")]),
    ]
    report = load_staged(db, files, run_info(), NAMES)

    records = [r for f in files for r in read_staging(f)[1]]
    assert report.images == len(records) == 14
    assert report.detections == count(db, store.detections) == sum(
        len(r.get("detections") or []) for r in records if r["status"] == "ok")
    expected = {r["rel_path"]: [(i, int(d[0]), NAMES[int(d[0])], *map(float, d[1:]))
                                for i, d in enumerate(r.get("detections") or [])]
                for r in records if r["status"] == "ok"}
    assert stored_dets(db) == expected  # == compares doubles exactly; below, the signs of zeros
    if db.dialect.name == "postgresql":  # SQLite stores whole REALs as integers: -0.0 becomes 0
        zeros = stored_dets(db)["num/zeros.jpg"][0]
        assert [math.copysign(1, v) for v in zeros[4:]] == [-1, 1, 1, 1, 1, -1, 1, 1]  # x1 … h
    assert stored_dets(db)["tiny/denormal.jpg"][0][4:8] == (5e-324, 2.2250738585072014e-308, 0.0,
                                                           1.7976931348623157e+308)


@pytest.mark.parametrize("token", [".5", "5.", "+5", "05", "-05", "1.e5", "-.5", "00", "0x1p3",
                                   "inf", "1e5e5", "1.2.3", "--1", "1e+", ""])
def test_numbers_that_are_not_json_fail_the_load(db, tmp_path, token):
    good = det_line("fine.jpg", f"[[{ROW}]]")
    bad = det_line("bad.jpg", f"[[1.0, 0.5, {token}, 20.5, 30.0, 40.0, 0.03, 0.06, 0.03, 0.04]]")
    path = write_staging(tmp_path / "tokens.jsonl", [good, bad, good.replace("fine", "fine2")])
    with pytest.raises(ValueError, match=r"corrupt at line 3") as err:
        load_staged(db, [path], run_info(), NAMES)
    assert str(path) in str(err.value)
    assert count(db, store.images) == 0 and count(db, store.models) == 0


@pytest.mark.parametrize(("dets", "message"), [
    (f"[[{ROW[:-6]}], [{ROW}, 9.0]]", "detection 0: expected 10 numbers"),  # 9 + 11: 20 in all
    (f"[[{ROW}], [{ROW[:-6]}]]", "detection 1: expected 10 numbers"),
    (f"[[{ROW}], []]", "detection 1: expected 10 numbers"),
    (f"[[{ROW}], [[{ROW}]]]", "detection 1: expected 10 numbers"),
    ("[[-1.0" + ROW[3:] + "]]", "cls must be a class index"),
    ("[[3e9" + ROW[3:] + "]]", "cls must be a class index"),  # beyond the INTEGER column
    ("[[1e400" + ROW[3:] + "]]", "cls must be finite"),
    (f"[[{ROW}], [{ROW.replace('0.5', '0.5, ', 1)[:-6]}]]", "corrupt at line 2"),  # ", , "
])
def test_detections_that_are_not_ten_numbers_are_refused_with_a_precise_message(
        db, tmp_path, dets, message):
    files, _ = two_shards(tmp_path)
    load_staged(db, files, run_info(), NAMES)
    before = dump(db)
    path = write_staging(tmp_path / "rows.jsonl", [det_line("rows.jpg", dets)])
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        load_staged(db, [*files, path], run_info(), NAMES)
    assert str(path) in str(err.value)
    assert dump(db) == before


# Number spellings a JSON writer may use, some of them hard to round correctly.
SPELLINGS = ["0", "-0", "-0.0", "1E5", "1e+05", "7e0", "0.05", "1e-05", "9007199254740993",
             "123456789012345678901234567890", "2.2250738585072011e-308", "2.2250738585072014e-308",
             "4.9406564584124654e-324", "2.4703282292062328e-324", "2.4703282292062327e-324",
             "1e-400", "1.7976931348623157e+308", "0.1000000000000000055511151231257827021181583404541015625",
             "1.00000000000000011102230246251565404236316680908203125",
             "1.00000000000000011102230246251565404236316680908203125001"]


def test_the_staging_reader_reads_every_number_as_json_loads_does(tmp_path, monkeypatch):
    """msgspec decodes the worker's lines; its doubles must be json.loads's, bit for bit."""
    monkeypatch.setattr(staging, "_checked", lambda record: pytest.fail("not decoded by msgspec"))
    rng = np.random.default_rng(5)
    doubles = (rng.standard_normal(4000) * 10.0 ** rng.integers(-300, 300, 4000)).tolist()
    float32s = rng.uniform(0, 12000, 2000).astype(np.float32).tolist()
    tokens = [*SPELLINGS, *map(repr, doubles), *map(repr, float32s), *(f"{v:.17g}" for v in doubles),
              *(f"{v:.6g}" for v in doubles), *(f"{v:.30e}" for v in doubles[:500])]
    tokens += ["0"] * (-len(tokens) % 9)
    rows = [f"[{k % 3}, {', '.join(tokens[i:i + 9])}]" for k, i in enumerate(range(0, len(tokens), 9))]
    lines = [det_line(f"n/{k}.jpg", "[" + ", ".join(rows[k:k + 50]) + "]")
             for k in range(0, len(rows), 50)]
    path = write_staging(tmp_path / "numbers.jsonl", lines)

    staged = staging.read_staged(path, SHA_A)
    expected = np.array([float(json.loads(t)) for t in tokens])
    assert staged.detections.shape == (len(rows), 10)
    assert (staged.detections[:, 1:].ravel().view(np.uint64) == expected.view(np.uint64)).all()


def test_every_staged_number_is_loaded_bit_for_bit(db, tmp_path):
    """Every loaded confidence and box value is the double the staging file holds; the txt
    lines made of the loaded rows are the ones made of the staged rows. (SQLite keeps a whole
    REAL as an integer, so there -0.0 comes back as 0.0.)"""
    rng = np.random.default_rng(77)
    records = [ok(f"f32/{k}.jpg", make_dets(rng, 7).astype(np.float32)) for k in range(40)]
    odd = [[1, 0.1, -0.0, 5e-324, 1e-310, 1.7976931348623157e308, 1 / 3, 0.30000000000000004,
            2.0**53 + 2, 2.2250738585072014e-308],
           [0, 5e-324, -1.7976931348623157e308, 123456.78901234567, 0.0, -1e-320, 0.5, 0.25,
            np.nextafter(0.5, 1.0), 1e-300],
           [2, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    records.append(ok("odd.jpg", np.array(odd)))
    path = stage(tmp_path / "numbers.jsonl", records)
    load_staged(db, [path], run_info(), NAMES)

    stored = stored_dets(db)
    sqlite = db.dialect.name == "sqlite"
    for record in read_staging(path)[1]:  # the staged values, as json.loads reads the file
        got = stored[record["rel_path"]]
        assert [d[1] for d in got] == [int(row[0]) for row in record["detections"]]
        want = [[(v + 0.0 if sqlite else v).hex() for v in map(float, row[1:])]
                for row in record["detections"]]
        assert [[v.hex() for v in d[3:]] for d in got] == want, record["rel_path"]
        loaded = np.array([[d[1], *d[3:]] for d in got])
        assert format_txt(loaded) == format_txt(np.array(record["detections"]))


def test_class_names_and_unknown_classes_round_trip(db, tmp_path):
    names = {0: "tab\there", 1: "back\\slash\\N", 2: "new\nline\r\n", 3: "\\N", 4: ""}
    dets = ", ".join(f"[{c}.0, 0.5, 1.0, 2.0, 3.0, 4.0, 0.1, 0.2, 0.3, 0.4]" for c in range(7))
    path = write_staging(tmp_path / "classes.jsonl", [det_line("classes.jpg", f"[{dets}]")])
    load_staged(db, [path], run_info(), names)
    stored = stored_dets(db)["classes.jpg"]
    assert [(d[1], d[2]) for d in stored] == [*names.items(), (5, "5"), (6, "6")]


def test_worker_files_are_checked_as_msgspec_decodes_them(db, tmp_path, monkeypatch):
    def checked(record):
        raise AssertionError(f"{record.get('rel_path')!r} was checked value by value")

    monkeypatch.setattr(staging, "_checked", checked)
    files, records = two_shards(tmp_path)
    rng = np.random.default_rng(33)
    awkward = [ok(name, make_dets(rng, 2)) for name in AWKWARD] + [failed("x\ty.jpg", "a\\N\tb")]
    files.append(stage(tmp_path / "awkward.jsonl", awkward))
    report = load_staged(db, files, run_info(), NAMES)
    assert report.images == len(records) + len(awkward)
    assert stored_dets(db) == expected_dets(records + awkward)


def test_same_image_in_two_files_is_refused(db, tmp_path):
    rng = np.random.default_rng(6)
    a = stage(tmp_path / "a.jsonl", [ok("dup.jpg", make_dets(rng, 1))])
    b = stage(tmp_path / "b.jsonl", [ok("dup.jpg", make_dets(rng, 2))])
    with pytest.raises(ValueError, match="dup.jpg"):
        load_staged(db, [a, b], run_info(), NAMES)
    assert count(db, store.images) == 0 and count(db, store.runs) == 0


def test_run_row_is_replaced_on_reload(db, tmp_path):
    files, records = two_shards(tmp_path)
    load_staged(db, files, run_info(infer_seconds=7.0), NAMES)
    load_staged(db, files, run_info(infer_seconds=3.5), NAMES)
    r = store.runs
    with db.connect() as conn:
        rows = conn.execute(sa.select(r)).mappings().all()
    assert len(rows) == 1
    row = rows[0]
    assert row["run_key"] == "nightly_detections/scheduled__2026-11-20T02:00:00+00:00"
    assert (row["dag_id"], row["drop_date"], row["model_sha256"]) == ("nightly_detections", D1, SHA_A)
    assert (row["images"], row["ok"], row["failed"]) == (14, 13, 1)
    assert row["detections"] == sum(len(x["detections"]) for x in records)
    assert row["infer_seconds"] == 3.5 and row["images_per_s"] == pytest.approx(14 / 3.5)
    assert '"imgsz": 640' in row["settings"]


def test_names_default_to_the_stored_model_names(db, tmp_path):
    upsert_model(db, SHA_A, "/models/demo.pt", {0: "zebra", 1: "yak", 2: "xerus"})
    rng = np.random.default_rng(12)
    recs = [ok("n.jpg", make_dets(rng, 20))]
    load_staged(db, [stage(tmp_path / "n.jsonl", recs)], run_info())
    assert stored_dets(db) == expected_dets(recs, {0: "zebra", 1: "yak", 2: "xerus"})


def test_empty_load_records_a_visibly_empty_run(db):
    report = load_staged(db, [], run_info(), NAMES)
    assert (report.images, report.detections) == (0, 0)
    with db.connect() as conn:
        row = conn.execute(sa.select(store.runs.c.images, store.runs.c.model_sha256)).one()
    assert tuple(row) == (0, None)
    assert drop_summary(db, D1) == {"images": 0, "ok": 0, "failed": 0, "detections": 0,
                                    "per_class": {}}


def test_record_empty_run_keeps_the_model_and_its_names(db):
    upsert_model(db, SHA_A, "/models/demo.pt", NAMES)
    store.record_empty_run(db, run_info(), SHA_A)
    store.record_empty_run(db, run_info("nightly_detections/other_model"), SHA_B)  # unknown model
    with db.connect() as conn:
        rows = {r.run_key: (r.model_sha256, r.images, r.ok, r.failed, r.detections)
                for r in conn.execute(sa.select(store.runs))}
        assert store.model_names(conn, SHA_A) == NAMES
        assert store.model_names(conn, SHA_B) == {}
    assert rows == {"nightly_detections/scheduled__2026-11-20T02:00:00+00:00": (SHA_A, 0, 0, 0, 0),
                    "nightly_detections/other_model": (SHA_B, 0, 0, 0, 0)}
    upsert_model(db, SHA_A, "", None)  # no path known: the stored one stays
    assert dump(db)["models"][0][1:3] == ("demo.pt", "/models/demo.pt")


# --- queries ----------------------------------------------------------------------------------

def test_loaded_rel_paths_only_ok_for_that_model_and_date(db, tmp_path):
    rng = np.random.default_rng(7)
    load_staged(db, [stage(tmp_path / "a.jsonl", [ok("x.jpg", make_dets(rng, 1)), failed("y.jpg"),
                                                  ok("z.jpg", make_dets(rng, 0))])],
                run_info(), NAMES)
    load_staged(db, [stage(tmp_path / "b.jsonl", [ok("only_b.jpg", make_dets(rng, 1))], SHA_B)],
                run_info("nightly_detections/b"), NAMES)
    load_staged(db, [stage(tmp_path / "c.jsonl", [ok("only_d2.jpg", make_dets(rng, 1))])],
                run_info("nightly_detections/d2", D2), NAMES)
    assert loaded_rel_paths(db, SHA_A, D1) == {"x.jpg", "z.jpg"}
    assert loaded_rel_paths(db, SHA_B, D1) == {"only_b.jpg"}
    assert loaded_rel_paths(db, SHA_A, D2) == {"only_d2.jpg"}
    assert loaded_rel_paths(db, SHA_B, D2) == set()


def test_drop_summary_counts_per_class(db, tmp_path):
    files, records = two_shards(tmp_path)
    load_staged(db, files, run_info(), NAMES)
    rng = np.random.default_rng(9)
    load_staged(db, [stage(tmp_path / "d2.jsonl", [ok("z.jpg", make_dets(rng, 5))])],
                run_info("nightly_detections/d2", D2), NAMES)

    per_class: dict[str, int] = {}
    for r in records:
        for det in r["detections"]:
            per_class[NAMES[int(det[0])]] = per_class.get(NAMES[int(det[0])], 0) + 1
    summary = drop_summary(db, D1, SHA_A)
    assert summary == {"images": 14, "ok": 13, "failed": 1, "detections": sum(per_class.values()),
                       "per_class": per_class}
    assert drop_summary(db, D1, SHA_B)["images"] == 0
    assert drop_summary(db)["images"] == 15
    assert drop_summary(db)["detections"] == sum(per_class.values()) + 5
