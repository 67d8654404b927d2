"""The results DB as comparable rows: what idempotency and equality assertions look at."""

from __future__ import annotations

import sqlalchemy as sa


def result_rows(url: str) -> dict[str, list[tuple]]:
    """Images and detections by identity, without ids, run keys or timestamps.

    Dates come back as ``YYYY-MM-DD`` text from SQLite and PostgreSQL alike.
    """
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            images = conn.execute(sa.text(
                "SELECT drop_date, rel_path, model_sha256, status, error, width, height, bytes "
                "FROM images ORDER BY drop_date, rel_path")).all()
            dets = conn.execute(sa.text(
                "SELECT i.drop_date, i.rel_path, d.det_index, d.class_id, d.class_name, "
                "d.confidence, d.x1, d.y1, d.x2, d.y2, d.xc, d.yc, d.w, d.h FROM detections d "
                "JOIN images i ON i.id = d.image_id ORDER BY i.drop_date, i.rel_path, d.det_index")
            ).all()
    finally:
        engine.dispose()
    return {"images": [(str(r[0]), *r[1:]) for r in images],
            "detections": [(str(r[0]), *r[1:]) for r in dets]}
