"""Read queries behind the Detections page: nights, a night's images and failures, one image, a run.

Plain SQLAlchemy Core on the store's tables; no Airflow. Every function opens one short read
transaction and returns JSON-ready dicts (dates as ``YYYY-MM-DD``). Each answers from an
index, whatever the history holds:

- nights: ``drop_totals`` / ``drop_class_totals`` (one row per model and night, kept by the
  load), never an aggregate over the detections; a night's file accounting from
  ``night_files`` (one row) and its image rows by ``uq_images_identity``;
- a night's (or a run's) images: the images of that night by ``uq_images_identity`` (or of
  that run by ``ix_images_run_key``), each counted by an index probe into ``pk_detections``
  (a correlated subquery: the planner cannot turn it into a scan of every detection).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, select

from image_etl.store import (
    class_counts,
    count_if,
    detections,
    drop_class_totals,
    drop_totals,
    images,
    models,
    night_accounting,
    runs,
)
from image_etl.store.schema import run_id_of

MAX_NIGHTS = 366
MAX_PAGE = 500


@dataclasses.dataclass(frozen=True)
class ImageFilter:
    """Which detections count: one class and/or a minimum confidence (None: all)."""

    class_name: str | None = None
    min_conf: float | None = None

    @property
    def active(self) -> bool:
        return self.class_name is not None or self.min_conf is not None


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """Where an image's file is, as the load that wrote its row recorded it."""

    image_id: int
    rel_path: str
    drop_dir: str | None
    output_dir: str | None
    width: int | None
    height: int | None


@contextlib.contextmanager
def _reading(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            # These are index probes costed like scans: JIT would spend more compiling them
            # (~300 ms) than they take to run.
            conn.exec_driver_sql("SET LOCAL jit = off")
        yield conn


def _day(value: dt.date | str) -> str:
    return value.isoformat() if isinstance(value, dt.date) else str(value)[:10]


def _moment(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _class_order(names_json: str | None, seen: set[str]) -> list[str]:
    """Every class name of the model in class-id order (so position = class id, as the page
    colours them), then any other name the rows hold."""
    try:
        names = json.loads(names_json or "{}")
        ordered = [names[k] for k in sorted(names, key=int)]
    except (ValueError, TypeError, AttributeError):
        ordered = []
    return ordered + sorted(seen - set(ordered))


# --- models and nights ------------------------------------------------------------------------

def model_list(engine: Engine) -> list[dict[str, Any]]:
    """Every model with results: name, nights with results, the latest one; latest first."""
    t = drop_totals
    query = (select(models.c.sha256, models.c.name, func.count(t.c.drop_date), func.max(t.c.drop_date))
             .join(t, t.c.model_sha256 == models.c.sha256).group_by(models.c.sha256, models.c.name))
    with _reading(engine) as conn:
        rows = conn.execute(query).all()
    found = [{"sha256": sha, "name": name or sha[:12], "nights": int(n), "last_date": _day(last)}
             for sha, name, n, last in rows]
    return sorted(found, key=lambda m: (m["last_date"], m["sha256"]), reverse=True)


def nights(engine: Engine, model_sha256: str, limit: int = 30) -> dict[str, Any]:
    """The model's last ``limit`` nights with results, oldest first, with per-class counts."""
    limit = max(1, min(int(limit), MAX_NIGHTS))
    t, c = drop_totals, drop_class_totals
    totals = (select(t.c.drop_date, t.c.images, t.c.ok, t.c.failed, t.c.detections, t.c.updated_at)
              .where(t.c.model_sha256 == model_sha256).order_by(t.c.drop_date.desc()).limit(limit))
    with _reading(engine) as conn:
        rows = conn.execute(totals).all()
        per_class: dict[str, dict[str, int]] = {}
        if rows:
            classes = select(c.c.drop_date, c.c.class_name, c.c.detections).where(
                c.c.model_sha256 == model_sha256, c.c.drop_date >= rows[-1].drop_date)
            for day, name, count in conn.execute(classes):
                per_class.setdefault(_day(day), {})[name] = int(count)
        names = conn.execute(select(models.c.class_names)
                             .where(models.c.sha256 == model_sha256)).scalar()
    seen = {name for counts in per_class.values() for name in counts}
    return {"model": model_sha256, "classes": _class_order(names, seen),
            "nights": [{"date": _day(r.drop_date), "images": int(r.images), "ok": int(r.ok),
                        "failed": int(r.failed), "detections": int(r.detections),
                        "per_class": per_class.get(_day(r.drop_date), {}),
                        "updated_at": _moment(r.updated_at)} for r in reversed(rows)]}


def night(engine: Engine, model_sha256: str, drop_date: dt.date) -> dict[str, Any] | None:
    """One night's totals and per-class counts; None when it has no results."""
    t, c = drop_totals, drop_class_totals
    key = (t.c.model_sha256 == model_sha256, t.c.drop_date == drop_date)
    with _reading(engine) as conn:
        row = conn.execute(select(t.c.images, t.c.ok, t.c.failed, t.c.detections).where(*key)).first()
        if row is None:
            return None
        per_class = {name: int(n) for name, n in conn.execute(
            select(c.c.class_name, c.c.detections).where(
                c.c.model_sha256 == model_sha256, c.c.drop_date == drop_date))}
        names = conn.execute(select(models.c.class_names)
                             .where(models.c.sha256 == model_sha256)).scalar()
        files = night_accounting(conn, model_sha256, drop_date)
    classes = _class_order(names, set(per_class))
    return {"model": model_sha256, "date": _day(drop_date), "images": int(row.images),
            "ok": int(row.ok), "failed": int(row.failed), "detections": int(row.detections),
            "classes": classes, "per_class": {n: per_class[n] for n in classes},
            "files": _files(files)}


def _files(accounting: dict[str, Any]) -> dict[str, Any]:
    """The night's file accounting as the page shows it (the report's numbers)."""
    keep = ("listed", "ok", "failed", "caught_up", "unsettled", "unsettled_names",
            "skipped_links", "skipped_unknown", "skipped_hidden", "checked_at", "settings",
            "mixed_settings")
    out = {k: accounting[k] for k in keep}
    out["checked_by_run"] = run_id_of(accounting["checked_by"]) if accounting["checked_by"] else None
    return out


# --- image lists --------------------------------------------------------------------------------

def _night_rows(model_sha256: str, drop_date: dt.date) -> Any:
    return and_(images.c.model_sha256 == model_sha256, images.c.drop_date == drop_date)


def _run_rows(run_key: str) -> Any:
    return images.c.run_key == run_key


def _image_list(engine: Engine, where: Any, flt: ImageFilter, limit: int, offset: int
                ) -> dict[str, Any]:
    """Images matching ``where`` by matching-detection count (most first), then path.

    With a filter only images with at least one matching detection are listed. ``total``
    counts every listed image (a window over the same rows, before the page is cut).
    """
    i, d = images, detections
    matching = [d.c.image_id == i.c.id]
    if flt.class_name is not None:
        matching.append(d.c.class_name == flt.class_name)
    if flt.min_conf is not None:
        matching.append(d.c.confidence >= flt.min_conf)
    n = select(func.count()).where(*matching).scalar_subquery()
    best = select(func.max(d.c.confidence)).where(*matching).scalar_subquery()
    counted = select(i.c.id, i.c.drop_date, i.c.rel_path, i.c.status, i.c.error,
                     n.label("n"), best.label("best")).where(where).subquery()
    query = select(counted, func.count().over().label("total"))
    if flt.active:
        query = query.where(counted.c.n > 0)
    query = (query.order_by(counted.c.n.desc(), counted.c.drop_date, counted.c.rel_path)
             .limit(max(1, min(int(limit), MAX_PAGE))).offset(max(0, int(offset))))
    with _reading(engine) as conn:
        rows = conn.execute(query).all()
    return {"total": int(rows[0].total) if rows else 0, "offset": offset,
            "images": [{"id": int(r.id), "date": _day(r.drop_date), "rel_path": r.rel_path,
                        "status": r.status, "error": r.error, "detections": int(r.n),
                        "best_confidence": r.best} for r in rows]}


def night_images(engine: Engine, model_sha256: str, drop_date: dt.date,
                 flt: ImageFilter = ImageFilter(), limit: int = 100, offset: int = 0
                 ) -> dict[str, Any]:
    return _image_list(engine, _night_rows(model_sha256, drop_date), flt, limit, offset)


def run_images(engine: Engine, run_key: str, flt: ImageFilter = ImageFilter(), limit: int = 100,
               offset: int = 0) -> dict[str, Any]:
    return _image_list(engine, _run_rows(run_key), flt, limit, offset)


def night_failures(engine: Engine, model_sha256: str, drop_date: dt.date, limit: int = 100,
                   offset: int = 0) -> dict[str, Any]:
    """The night's failed images with their reasons, by path."""
    i = images
    query = (select(i.c.id, i.c.rel_path, i.c.error, i.c.run_key, i.c.processed_at,
                    func.count().over().label("total"))
             .where(_night_rows(model_sha256, drop_date), i.c.status == "failed")
             .order_by(i.c.rel_path).limit(max(1, min(int(limit), MAX_PAGE)))
             .offset(max(0, int(offset))))
    with _reading(engine) as conn:
        rows = conn.execute(query).all()
    return {"total": int(rows[0].total) if rows else 0, "offset": offset,
            "failures": [{"id": int(r.id), "rel_path": r.rel_path, "error": r.error,
                          "run_id": run_id_of(r.run_key), "processed_at": _moment(r.processed_at)}
                         for r in rows]}


# --- one image ------------------------------------------------------------------------------------

def image_detail(engine: Engine, image_id: int) -> dict[str, Any] | None:
    """An image's row, its model's names and its detections (pixel boxes), by det_index."""
    i, d = images, detections
    with _reading(engine) as conn:
        row = conn.execute(select(i.c.id, i.c.model_sha256, i.c.drop_date, i.c.rel_path,
                                  i.c.run_key, i.c.bytes, i.c.width, i.c.height, i.c.status,
                                  i.c.error, i.c.processed_at, models.c.name)
                           .join(models, models.c.sha256 == i.c.model_sha256)
                           .where(i.c.id == image_id)).first()
        if row is None:
            return None
        dets = conn.execute(select(d.c.det_index, d.c.class_id, d.c.class_name, d.c.confidence,
                                   d.c.x1, d.c.y1, d.c.x2, d.c.y2)
                            .where(d.c.image_id == image_id).order_by(d.c.det_index)).all()
    return {"id": int(row.id), "model": row.model_sha256, "model_name": row.name,
            "date": _day(row.drop_date), "rel_path": row.rel_path, "run_id": run_id_of(row.run_key),
            "bytes": row.bytes, "width": row.width, "height": row.height, "status": row.status,
            "error": row.error, "processed_at": _moment(row.processed_at),
            "detections": [dict(r._mapping) for r in dets]}


def image_file(engine: Engine, image_id: int) -> ImageFile | None:
    """The recorded location of an image's file (the caller confines and opens it)."""
    i = images
    with _reading(engine) as conn:
        row = conn.execute(select(i.c.id, i.c.rel_path, i.c.drop_dir, i.c.output_dir, i.c.width,
                                  i.c.height).where(i.c.id == image_id)).first()
    return None if row is None else ImageFile(int(row.id), row.rel_path, row.drop_dir,
                                              row.output_dir, row.width, row.height)


# --- one run --------------------------------------------------------------------------------------

def run_overview(engine: Engine, run_key: str) -> dict[str, Any] | None:
    """A DAG run: its last load (``runs`` row) and, per night and model, the images whose
    rows it wrote (a later run may have replaced some) with their detections per class."""
    i, r = images, runs
    with _reading(engine) as conn:
        run = conn.execute(select(r.c.run_id, r.c.dag_id, r.c.drop_date, r.c.model_sha256,
                                  r.c.loaded_at, r.c.images, r.c.ok, r.c.failed, r.c.detections,
                                  r.c.infer_seconds, r.c.images_per_s)
                           .where(r.c.run_key == run_key)).first()
        groups = conn.execute(
            select(i.c.drop_date, i.c.model_sha256, func.count(), count_if(i.c.status == "ok"),
                   count_if(i.c.status == "failed"))
            .where(_run_rows(run_key)).group_by(i.c.drop_date, i.c.model_sha256)).all()
        per_class = conn.execute(class_counts(conn, _run_rows(run_key), i.c.drop_date,
                                              i.c.model_sha256)).all()
        names = conn.execute(select(models.c.class_names).where(
            models.c.sha256.in_(sorted({g[1] for g in groups})))).scalars().all()
    if run is None and not groups:
        return None
    classes: dict[tuple[str, str], dict[str, int]] = {}
    for day, sha, name, n in per_class:
        classes.setdefault((_day(day), sha), {})[name] = int(n)
    nights_ = [{"date": _day(day), "model": sha, "images": int(n), "ok": int(ok),
                "failed": int(failed), "per_class": classes.get((_day(day), sha), {}),
                "detections": sum(classes.get((_day(day), sha), {}).values())}
               for day, sha, n, ok, failed in sorted(groups, key=lambda g: (g[0], g[1]))]
    last_load = None if run is None else {
        "drop_date": _day(run.drop_date), "model": run.model_sha256,
        "loaded_at": _moment(run.loaded_at), "images": run.images, "ok": run.ok,
        "failed": run.failed, "detections": run.detections, "infer_seconds": run.infer_seconds,
        "images_per_s": run.images_per_s}
    seen = {name for _, _, name, _ in per_class}
    ordered = [c for text in names for c in _class_order(text, set())]
    return {"run_key": run_key, "run_id": run_id_of(run_key), "last_load": last_load,
            "classes": list(dict.fromkeys(ordered + sorted(seen - set(ordered)))),
            "nights": nights_}
