"""Read-only questions the stages (and the Detections page) ask the results database."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Engine, case, func, select, true, union

from image_etl.store.schema import (
    detections,
    drop_totals,
    images,
    night_files,
    result_settings,
    runs,
)


def count_if(condition: Any) -> Any:
    """How many rows meet ``condition`` (0, not NULL, when there are none)."""
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def class_counts(conn: Connection, where: Any, *keys: Any) -> Any:
    """SELECT *keys, class_name, count: the detections of the images matching ``where``.

    On PostgreSQL each image's detections come from a LATERAL probe of ``pk_detections``
    (its OFFSET keeps the planner from flattening it into a join): a plain join is costed as
    a hash join over a scan of every detection, which the planner picks for mid-sized
    histories (10 nights: 230 ms instead of 85).
    """
    i, d = images, detections
    if conn.dialect.name != "postgresql":
        return (select(*keys, d.c.class_name, func.count())
                .select_from(d.join(i, i.c.id == d.c.image_id)).where(where)
                .group_by(*keys, d.c.class_name))
    per_image = (select(d.c.class_name).where(d.c.image_id == i.c.id).offset(0)
                 .lateral("per_image"))
    return (select(*keys, per_image.c.class_name, func.count())
            .select_from(i.join(per_image, true())).where(where)
            .group_by(*keys, per_image.c.class_name))


def loaded_rel_paths(engine: Engine, model_sha256: str, drop_date: dt.date) -> set[str]:
    """rel_paths this model already loaded with status 'ok' for ``drop_date``."""
    query = select(images.c.rel_path).where(
        images.c.model_sha256 == model_sha256, images.c.drop_date == drop_date,
        images.c.status == "ok")
    with engine.connect() as conn:
        return set(conn.execute(query).scalars())


def image_rows(engine: Engine, model_sha256: str, drop_date: dt.date
               ) -> dict[str, tuple[str, str | None]]:
    """rel_path → (status, result_key) of every image row this model has for ``drop_date``
    (result_key None: loaded before result settings were recorded). One probe of
    ``uq_images_identity``."""
    query = select(images.c.rel_path, images.c.status, images.c.result_key).where(
        images.c.model_sha256 == model_sha256, images.c.drop_date == drop_date)
    with engine.connect() as conn:
        return {rel: (status, key) for rel, status, key in conn.execute(query)}


def nights_that_ran(engine: Engine, model_sha256: str, dates: Iterable[dt.date]) -> set[dt.date]:
    """Which of ``dates`` a run already took care of for this model: their files were
    listed (``night_files``) or rows loaded (``drop_totals``, for loads before revision 0003).
    Primary-key probes only."""
    dates = list(dates)
    if not dates:
        return set()
    f, t = night_files, drop_totals
    query = union(
        select(f.c.drop_date).where(f.c.model_sha256 == model_sha256, f.c.drop_date.in_(dates)),
        select(t.c.drop_date).where(t.c.model_sha256 == model_sha256, t.c.drop_date.in_(dates)))
    with engine.connect() as conn:
        return {_as_date(d) for d in conn.execute(query).scalars()}


def _as_date(value: Any) -> dt.date:
    return value if isinstance(value, dt.date) else dt.date.fromisoformat(str(value)[:10])


def night_accounting(conn: Connection, model_sha256: str, drop_date: dt.date) -> dict[str, Any]:
    """Every file of a night for one model: what was listed (as last listed), loaded ok,
    failed, caught up later, still being written, skipped; and the result settings its rows
    were made with (more than one: the night mixes settings)."""
    i, f, r = images, night_files, result_settings
    night = (i.c.model_sha256 == model_sha256, i.c.drop_date == drop_date)
    n, ok, failed, late = conn.execute(select(
        func.count(), count_if(i.c.status == "ok"), count_if(i.c.status == "failed"),
        count_if(i.c.caught_up == true())).where(*night)).one()
    per_key = conn.execute(
        select(i.c.result_key, r.c.settings, func.count())
        .select_from(i.outerjoin(r, r.c.result_key == i.c.result_key)).where(*night)
        .group_by(i.c.result_key, r.c.settings).order_by(func.count().desc())).all()
    files = conn.execute(select(f).where(f.c.model_sha256 == model_sha256,
                                         f.c.drop_date == drop_date)).first()
    listing: dict[str, Any] = {"listed": None, "unsettled": None, "unsettled_names": [],
                               "skipped_links": None, "skipped_unknown": None,
                               "skipped_hidden": None, "checked_at": None, "checked_by": None}
    if files is not None:
        listing.update({k: getattr(files, k) for k in ("listed", "unsettled", "skipped_links",
                                                       "skipped_unknown", "skipped_hidden")})
        listing.update(unsettled_names=json.loads(files.unsettled_names),
                       checked_at=files.checked_at.isoformat() if files.checked_at else None,
                       checked_by=files.run_key)
    settings = [{"result_key": key, "images": int(count),
                 "settings": json.loads(text) if text else None} for key, text, count in per_key]
    return {**listing, "images": int(n), "ok": int(ok), "failed": int(failed),
            "caught_up": int(late), "settings": settings, "mixed_settings": len(settings) > 1}


def drop_summary(engine: Engine, drop_date: dt.date | None = None,
                 model_sha256: str | None = None) -> dict[str, Any]:
    """Counts for a drop (all drops / all models when None).

    ``{"images", "ok", "failed", "detections": total, "per_class": {class_name: count}}``.
    """
    where = []
    if drop_date is not None:
        where.append(images.c.drop_date == drop_date)
    if model_sha256 is not None:
        where.append(images.c.model_sha256 == model_sha256)
    counts = select(func.count(), count_if(images.c.status == "ok"),
                    count_if(images.c.status == "failed")).select_from(images).where(*where)
    per_class = (select(detections.c.class_name, func.count())
                 .select_from(detections.join(images, images.c.id == detections.c.image_id))
                 .where(*where).group_by(detections.c.class_name)
                 .order_by(detections.c.class_name))
    with engine.connect() as conn:
        n, ok, failed = conn.execute(counts).one()
        classes = {name: int(count) for name, count in conn.execute(per_class)}
    return {"images": int(n), "ok": int(ok), "failed": int(failed),
            "detections": sum(classes.values()), "per_class": classes}


def latest_run(engine: Engine, drop_date: dt.date) -> dict[str, Any] | None:
    """The most recently loaded run of a drop: its counts and throughput."""
    query = (select(runs.c.run_key, runs.c.images, runs.c.failed, runs.c.detections,
                    runs.c.infer_seconds, runs.c.images_per_s, runs.c.loaded_at)
             .where(runs.c.drop_date == drop_date).order_by(runs.c.loaded_at.desc()).limit(1))
    with engine.connect() as conn:
        row = conn.execute(query).first()
    return None if row is None else dict(row._mapping)
