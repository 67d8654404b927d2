"""Loads: staging files → rows, one transaction per load, replacing what was loaded before.

For every staged image its row is upserted (the id is kept) and its old detections are
replaced by the staged ones. Both databases take the same steps: the images go to a temp
stage table, one INSERT ... SELECT ... ON CONFLICT upserts them and returns their ids, one
DELETE drops their old detections, then the new detections go straight into ``detections``.
Only the bulk writes differ: ``COPY`` on PostgreSQL (postgres_copy.py), executemany on SQLite.
Last, the night's totals (``drop_totals`` / ``drop_class_totals``) are recounted, in the same
transaction, so they always agree with the rows.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Date,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    func,
    literal,
    select,
    true,
)

from image_etl.staging import ImageRow, StagedFile, read_headers, read_staged
from image_etl.store import postgres_copy
from image_etl.store.engine import dialect_insert, in_transaction, write_transaction
from image_etl.store.queries import class_counts, count_if
from image_etl.store.schema import (
    detections,
    drop_class_totals,
    drop_totals,
    images,
    models,
    night_files,
    result_settings,
    runs,
)

log = logging.getLogger(__name__)

# pg_advisory_xact_lock namespace of loads (ASCII "imge").
_PG_LOCK_LOAD_NS = 0x696D6765
# Detections per COPY chunk or SQLite executemany.
_BATCH_ROWS = 16_384


@dataclasses.dataclass
class RunInfo:
    """The DAG run a load belongs to; ``run_key`` is its identity in ``runs``."""

    run_key: str
    dag_id: str
    run_id: str
    drop_date: dt.date
    settings: dict[str, Any]
    infer_seconds: float = 0.0
    # The result settings the rows were made with (image_etl.identity); None: not recorded.
    result_key: str | None = None
    result_settings: dict[str, Any] | None = None
    # Late files of an earlier night, loaded by this (later) run: their rows are marked
    # caught_up and the run's own ``runs`` row (which describes its own night) is left alone.
    caught_up: bool = False


@dataclasses.dataclass
class LoadReport:
    images: int
    ok: int
    failed: int
    detections: int
    seconds: float
    rows_per_s: float


@dataclasses.dataclass
class _Counts:
    images: int = 0
    ok: int = 0
    failed: int = 0
    detections: int = 0


_stage_images = Table(
    "image_etl_stage_images", MetaData(),
    Column("rel_path", Text, nullable=False),
    Column("bytes", BigInteger),
    Column("width", Integer),
    Column("height", Integer),
    Column("status", Text, nullable=False),
    Column("error", Text),
    prefixes=["TEMPORARY"], postgresql_on_commit="DROP",
)


# --- models, runs ---------------------------------------------------------------------------

def upsert_model(conn_or_engine: Connection | Engine, sha256: str, path: str,
                 names: dict[int, str] | None) -> None:
    """Insert or update the model's row; ``first_seen`` stays as first written.

    ``names`` None keeps the class names already stored (``{}`` for a new row).
    """
    _check_sha(sha256)
    with in_transaction(conn_or_engine) as conn:
        stmt = dialect_insert(conn, models).values(
            sha256=sha256, name=Path(path).name if path else None, path=path or None,
            class_names=_names_json(names or {}), first_seen=_now())
        # An empty path (a staging header without one) keeps the stored path.
        update: dict[str, Any] = {"name": func.coalesce(stmt.excluded.name, models.c.name),
                                  "path": func.coalesce(stmt.excluded.path, models.c.path)}
        if names is not None:
            update["class_names"] = stmt.excluded.class_names
        conn.execute(stmt.on_conflict_do_update(index_elements=[models.c.sha256], set_=update))


def model_names(conn: Connection, sha256: str) -> dict[int, str] | None:
    """The class names stored for a model, or None when the model is unknown."""
    text = conn.execute(select(models.c.class_names).where(models.c.sha256 == sha256)).scalar()
    return None if text is None else {int(k): v for k, v in json.loads(text).items()}


def record_empty_run(conn_or_engine: Connection | Engine, run: RunInfo,
                     model_sha256: str | None = None) -> None:
    """A run with nothing to load still gets its ``runs`` row (zero counts): visibly empty.

    An unknown ``model_sha256`` gets a models row without class names (see upsert_model).
    """
    with in_transaction(conn_or_engine) as conn:
        if model_sha256 is not None:
            _check_sha(model_sha256)
            stmt = dialect_insert(conn, models).values(sha256=model_sha256, name=None, path=None,
                                                       class_names="{}", first_seen=_now())
            conn.execute(stmt.on_conflict_do_nothing(index_elements=[models.c.sha256]))
        _upsert_run(conn, run, model_sha256, _now(), _Counts())


def _record_result_settings(conn: Connection, run: RunInfo, now: dt.datetime) -> None:
    """The row naming the run's result_key (kept as first written: equal key, equal settings)."""
    if run.result_key is None:
        return
    stmt = dialect_insert(conn, result_settings).values(
        result_key=run.result_key, first_seen=now,
        settings=json.dumps(run.result_settings or {}, sort_keys=True, default=str))
    conn.execute(stmt.on_conflict_do_nothing(index_elements=[result_settings.c.result_key]))


def record_night_files(engine: Engine, sha: str, drop_date: dt.date, run_key: str,
                       files: dict[str, Any]) -> None:
    """A night's file accounting as ``run_key`` listed it (replacing an older listing)."""
    _check_sha(sha)
    row = {"model_sha256": sha, "drop_date": drop_date, "run_key": run_key,
           "checked_at": _now(), "unsettled_names": json.dumps(files["unsettled_names"]),
           **{k: int(files[k]) for k in ("listed", "unsettled", "skipped_links",
                                          "skipped_unknown", "skipped_hidden")}}
    with write_transaction(engine) as conn:
        stmt = dialect_insert(conn, night_files).values(**row)
        conn.execute(stmt.on_conflict_do_update(
            index_elements=[night_files.c.model_sha256, night_files.c.drop_date],
            set_={k: stmt.excluded[k] for k in row if k not in ("model_sha256", "drop_date")}))


def _names_json(names: dict[int, str]) -> str:
    return json.dumps({str(int(k)): str(v) for k, v in sorted(names.items())}, ensure_ascii=False)


def _check_sha(sha256: str) -> None:
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"model sha256 must be 64 lowercase hex digits, got {sha256!r}")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _upsert_run(conn: Connection, run: RunInfo, sha: str | None, now: dt.datetime,
                counts: _Counts) -> None:
    """The run's row, replaced when the run_key was loaded before."""
    seconds = float(run.infer_seconds or 0.0)
    row = {"run_key": run.run_key, "dag_id": run.dag_id, "run_id": run.run_id,
           "drop_date": run.drop_date, "model_sha256": sha,
           "settings": json.dumps(run.settings, sort_keys=True, default=str),
           "loaded_at": now, "images": counts.images, "ok": counts.ok, "failed": counts.failed,
           "detections": counts.detections, "infer_seconds": seconds,
           "images_per_s": counts.images / seconds if seconds > 0 else None}
    stmt = dialect_insert(conn, runs).values(**row)
    conn.execute(stmt.on_conflict_do_update(
        index_elements=[runs.c.run_key],
        set_={k: stmt.excluded[k] for k in row if k != "run_key"}))


# --- the load -------------------------------------------------------------------------------

def load_staged(engine: Engine, staging_files: list[Path], run: RunInfo,
                names: dict[int, str] | None = None) -> LoadReport:
    """Load shards' staging files as one transaction; return what was loaded.

    Upserts the model and the run, then for every staged image replaces its row (the id is
    kept) and all its detections. Anything failing rolls the whole load back. ``names`` are
    the model's class names (stored with the model); None uses those already stored.
    """
    started = time.perf_counter()
    files = [Path(p) for p in staging_files]
    headers = read_headers(files)
    counts = _Counts()
    with write_transaction(engine) as conn:
        now = _now()
        sha = None
        if headers:
            header = next(iter(headers.values()))
            sha = header["model_sha256"]
            if conn.dialect.name == "postgresql":  # two loads of the same model and date take turns
                conn.execute(select(func.pg_advisory_xact_lock(
                    _PG_LOCK_LOAD_NS, func.hashtext(f"{sha}/{run.drop_date.isoformat()}"))))
            _record_result_settings(conn, run, now)
            # The model's row last before the staging files are read (the crash tests aim there).
            upsert_model(conn, sha, str(header.get("model_path") or ""), names)
            if names is None:
                names = model_names(conn, sha)
            counts = _replace(conn, files, sha, run, names or {}, now)
            if counts.images:
                refresh_drop_totals(conn, sha, run.drop_date, now)
        if not run.caught_up:
            _upsert_run(conn, run, sha, now, counts)
    seconds = time.perf_counter() - started
    report = LoadReport(images=counts.images, ok=counts.ok, failed=counts.failed,
                        detections=counts.detections, seconds=seconds,
                        rows_per_s=(counts.images + counts.detections) / seconds if seconds > 0 else 0.0)
    log.info("loaded %d images (%d ok, %d failed), %d detections for %s in %.2fs (%.0f rows/s)",
             counts.images, counts.ok, counts.failed, counts.detections, run.run_key, seconds,
             report.rows_per_s)
    return report


def _replace(conn: Connection, files: list[Path], sha: str, run: RunInfo,
             names: dict[int, str], now: dt.datetime) -> _Counts:
    """Every staged image's row upserted (ids kept), its old detections replaced."""
    staged = _read_all(files, sha)
    counts = _count(staged)
    if not counts.images:
        return counts
    copy = conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg2"
    _stage(conn, [image for part in staged for image in part.images], copy)
    ids = _upsert_images(conn, sha, run, now)
    _delete_staged_detections(conn, sha, run)
    _write_detections(conn, _detection_batches(staged, ids), names, copy)
    if conn.dialect.name == "sqlite":  # PostgreSQL drops it at commit (ON COMMIT DROP)
        _stage_images.drop(conn)
    return counts


def _read_all(files: list[Path], sha: str) -> list[StagedFile]:
    """Every file read and checked; an image staged in two files is refused."""
    staged = []
    seen: dict[str, Path] = {}
    for path in files:
        part = read_staged(path, sha)
        for image in part.images:
            if image[0] in seen:
                raise ValueError(f"{image[0]!r} is staged in both {seen[image[0]]} and {path}")
            seen[image[0]] = path
        staged.append(part)
    return staged


def _count(staged: list[StagedFile]) -> _Counts:
    counts = _Counts()
    for part in staged:
        statuses = [image[4] for image in part.images]
        counts.images += len(statuses)
        counts.ok += statuses.count("ok")
        counts.failed += statuses.count("failed")
        counts.detections += len(part.detections)
    return counts


def _stage(conn: Connection, rows: list[ImageRow], copy: bool) -> None:
    """The staged images into a fresh temp table (COPY when ``copy``)."""
    if conn.dialect.name == "sqlite":
        # Temp tables live as long as the pooled connection: start from a clean slate.
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS temp.{_stage_images.name}")
    _stage_images.create(conn)
    if copy:
        postgres_copy.copy_csv(conn, _stage_images, rows)
    else:
        cols = [c.name for c in _stage_images.columns]
        conn.execute(_stage_images.insert(), [dict(zip(cols, row)) for row in rows])
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"ANALYZE {_stage_images.name}")  # the planner's row count


def _staged_identity(sha: str, run: RunInfo) -> Any:
    i, s = images, _stage_images
    return and_(i.c.model_sha256 == sha, i.c.drop_date == run.drop_date, i.c.rel_path == s.c.rel_path)


def _upsert_images(conn: Connection, sha: str, run: RunInfo, now: dt.datetime) -> dict[str, int]:
    """Stage → images, set-based (ids kept, new ones numbered in rel_path order); returns
    rel_path → id of every staged image."""
    s, i = _stage_images, images
    folders = [literal(_setting_text(run, key), Text) for key in ("drop_dir", "output_dir")]
    source = select(
        literal(sha, String(64)), literal(run.drop_date, Date), s.c.rel_path,
        literal(run.run_key, Text), s.c.bytes, s.c.width, s.c.height, s.c.status, s.c.error,
        literal(now, DateTime(timezone=True)), *folders, literal(run.result_key, String(16)),
        literal(run.caught_up, Boolean),
    ).where(true()).order_by(s.c.rel_path)  # WHERE: SQLite's INSERT…SELECT…ON CONFLICT needs one
    cols = ["model_sha256", "drop_date", "rel_path", "run_key", "bytes", "width", "height",
            "status", "error", "processed_at", "drop_dir", "output_dir", "result_key",
            "caught_up"]
    stmt = dialect_insert(conn, i).from_select(cols, source)
    stmt = stmt.on_conflict_do_update(
        index_elements=[i.c.model_sha256, i.c.drop_date, i.c.rel_path],
        set_={c: stmt.excluded[c] for c in cols[3:]})
    return {rel_path: image_id
            for image_id, rel_path in conn.execute(stmt.returning(i.c.id, i.c.rel_path))}


def _setting_text(run: RunInfo, key: str) -> str | None:
    value = run.settings.get(key) if isinstance(run.settings, dict) else None
    return str(value) if value else None


def _delete_staged_detections(conn: Connection, sha: str, run: RunInfo) -> None:
    staged_ids = select(images.c.id).join(_stage_images, _staged_identity(sha, run))
    conn.execute(delete(detections).where(detections.c.image_id.in_(staged_ids)))


_Batch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _detection_batches(staged: list[StagedFile], ids: dict[str, int]) -> Iterator[_Batch]:
    """The staged detections as column arrays, at most _BATCH_ROWS rows at a time:
    image_id, det_index, class_id, and the numbers after the class (schema.DET_COLS)."""
    for part in staged:
        image_ids = np.fromiter((ids[image[0]] for image in part.images), dtype=np.int64,
                                count=len(part.images))
        image_id = np.repeat(image_ids, part.counts)
        det_index = np.arange(len(image_id)) - np.repeat(np.cumsum(part.counts) - part.counts,
                                                         part.counts)
        class_id = part.detections[:, 0].astype(np.int64)  # whole numbers (staging.py checks)
        for start in range(0, len(image_id), _BATCH_ROWS):
            rows = slice(start, start + _BATCH_ROWS)
            yield image_id[rows], det_index[rows], class_id[rows], part.detections[rows, 1:]


def _write_detections(conn: Connection, batches: Iterator[_Batch], names: dict[int, str],
                      copy: bool) -> None:
    """Straight into ``detections``: binary COPY when ``copy``, else executemany."""
    if copy:
        postgres_copy.copy_detections(conn, (postgres_copy.detection_rows(*batch, names)
                                             for batch in batches))
        return
    cols = [c.name for c in detections.columns]
    for image_id, det_index, class_id, values in batches:
        classes = class_id.tolist()
        class_names = [names.get(c, str(c)) for c in classes]
        rows = zip(image_id.tolist(), det_index.tolist(), classes, class_names, *values.T.tolist())
        conn.execute(detections.insert(), [dict(zip(cols, row)) for row in rows])


# --- the night's totals ---------------------------------------------------------------------

def refresh_drop_totals(conn: Connection, sha: str, drop_date: dt.date,
                        now: dt.datetime | None = None) -> None:
    """Recount one (model, night) into drop_totals / drop_class_totals, in the caller's
    transaction (a load's, under its per-night lock on PostgreSQL)."""
    i = images
    night = and_(i.c.model_sha256 == sha, i.c.drop_date == drop_date)
    n, ok, failed = conn.execute(select(func.count(), count_if(i.c.status == "ok"),
                                        count_if(i.c.status == "failed")).where(night)).one()
    per_class = conn.execute(class_counts(conn, night)).all()
    key = {"model_sha256": sha, "drop_date": drop_date}
    # Its class rows go with it (ON DELETE CASCADE).
    conn.execute(delete(drop_totals).where(drop_totals.c.model_sha256 == sha,
                                           drop_totals.c.drop_date == drop_date))
    if not n:
        return
    conn.execute(drop_totals.insert().values(
        **key, images=int(n), ok=int(ok), failed=int(failed),
        detections=sum(int(count) for _, count in per_class), updated_at=now or _now()))
    if per_class:
        conn.execute(drop_class_totals.insert(),
                     [{**key, "class_name": name, "detections": int(count)}
                      for name, count in per_class])
