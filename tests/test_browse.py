"""The Detections page's queries (``image_etl.browse``) and what they read from the store
(revision 0002: each image's folders, the night totals kept by every load), on a SQLite file
and a real PostgreSQL. The revision's upgrade and downgrade: tests/test_store_revisions.py.

Expected values are recomputed here with plain SQL over ``images`` / ``detections``, never
taken from the code under test.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import sqlalchemy as sa

from image_etl import browse
from image_etl.staging import StagingWriter, image_record
from image_etl.store import RunInfo, engine_from_url, load_staged, migrate

from .pg import pg_url  # noqa: F401  (session fixture: a fresh PostgreSQL database)

SHA = "c3" * 32
OTHER = "d4" * 32
NAMES = {0: "spot", 1: "patch", 2: "scratch"}
D1, D2, D3 = dt.date(2026, 11, 18), dt.date(2026, 11, 19), dt.date(2026, 11, 20)
DAG = "nightly_detections"


@pytest.fixture
def db(db_url):
    eng = engine_from_url(db_url)
    migrate(eng)
    yield eng
    eng.dispose()


def dets(rng: np.random.Generator, n: int, w: int = 512, h: int = 3000) -> np.ndarray:
    if n == 0:
        return np.zeros((0, 10))
    cls = rng.integers(0, len(NAMES), n).astype(float)
    conf = rng.uniform(0.25, 1.0, n)
    x1, y1 = rng.uniform(0, w - 60, n), rng.uniform(0, h - 60, n)
    x2, y2 = x1 + rng.uniform(5, 60, n), y1 + rng.uniform(5, 60, n)
    return np.stack([cls, conf, x1, y1, x2, y2, (x1 + x2) / 2 / w, (y1 + y2) / 2 / h,
                     (x2 - x1) / w, (y2 - y1) / h], axis=1)


def run(run_id: str, day: dt.date, drop_dir: str = "/data/drops/{date}") -> RunInfo:
    return RunInfo(run_key=f"{DAG}/{run_id}", dag_id=DAG, run_id=run_id, drop_date=day,
                   settings={"drop_dir": drop_dir.replace("{date}", day.isoformat()),
                             "output_dir": f"/data/out/{day.isoformat()}", "conf": 0.25})


def load(engine, tmp_path, info: RunInfo, records: list[dict], sha: str = SHA) -> None:
    path = tmp_path / f"{info.run_id}-{info.drop_date}-{sha[:4]}.jsonl"
    writer = StagingWriter(path, "fp", {"model_sha256": sha, "model_path": "/models/m.pt"})
    writer.resume()
    for record in records:
        writer.append(record)
    writer.close()
    load_staged(engine, [path], info, names=NAMES)


def night_records(rng: np.random.Generator, n: int, failed: tuple[int, ...] = ()) -> list[dict]:
    out = []
    for k in range(n):
        if k in failed:
            out.append(image_record(f"line{k % 2}/scan_{k:03d}.jpg", status="failed", bytes_=10,
                                    width=0, height=0, error=f"cannot decode ({k})", dets=None))
        else:
            out.append(image_record(f"line{k % 2}/scan_{k:03d}.jpg", status="ok", bytes_=1000 + k,
                                    width=512, height=3000, error=None,
                                    dets=dets(rng, int(rng.integers(0, 7)))))
    return out


@pytest.fixture
def filled(db, tmp_path):
    """Three nights of one model (one with failures), one night of another."""
    rng = np.random.default_rng(7)
    load(db, tmp_path, run("scheduled__d1", D1), night_records(rng, 12, failed=(3,)))
    load(db, tmp_path, run("scheduled__d2", D2), night_records(rng, 9))
    load(db, tmp_path, run("scheduled__d3", D3), night_records(rng, 15, failed=(0, 7, 11)))
    load(db, tmp_path, run("other__d3", D3), night_records(rng, 4), sha=OTHER)
    return db


# --- independent truth ---------------------------------------------------------------------

def sql(engine, text: str, **params) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(text), params)]


def truth_nights(engine, sha: str) -> list[dict]:
    rows = sql(engine, "SELECT drop_date, count(*), sum(CASE WHEN status = 'ok' THEN 1 ELSE 0 END), "
                       "sum(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) FROM images "
                       "WHERE model_sha256 = :sha GROUP BY drop_date ORDER BY drop_date", sha=sha)
    classes = sql(engine, "SELECT i.drop_date, d.class_name, count(*) FROM detections d JOIN images i "
                          "ON i.id = d.image_id WHERE i.model_sha256 = :sha "
                          "GROUP BY i.drop_date, d.class_name", sha=sha)
    per_class: dict[str, dict[str, int]] = {}
    for day, name, n in classes:
        per_class.setdefault(str(day)[:10], {})[name] = n
    return [{"date": str(day)[:10], "images": n, "ok": ok, "failed": failed,
             "per_class": per_class.get(str(day)[:10], {}),
             "detections": sum(per_class.get(str(day)[:10], {}).values())}
            for day, n, ok, failed in rows]


def truth_counts(engine, where: str, class_name: str | None = None, min_conf: float | None = None,
                 **params) -> dict[str, int]:
    """rel_path → matching detection count, for the images matching ``where``."""
    match = ""
    if class_name is not None:
        match += " AND d.class_name = :cls"
        params["cls"] = class_name
    if min_conf is not None:
        match += " AND d.confidence >= :conf"
        params["conf"] = min_conf
    rows = sql(engine, f"SELECT i.rel_path, count(d.image_id) FROM images i LEFT JOIN detections d "
                       f"ON d.image_id = i.id{match} WHERE {where} GROUP BY i.id, i.rel_path", **params)
    return dict(rows)


# --- the store: each image's folders, the night totals ------------------------------------------

def test_every_load_keeps_the_night_totals(db, tmp_path):
    rng = np.random.default_rng(1)
    load(db, tmp_path, run("r1", D1), night_records(rng, 10, failed=(2,)))
    first = truth_nights(db, SHA)
    assert [{k: v for k, v in n.items() if k != "updated_at"}
            for n in browse.nights(db, SHA)["nights"]] == first
    # Reprocessing part of the night (other detections, one more failure) recounts it.
    records = night_records(np.random.default_rng(2), 6, failed=(4,))
    load(db, tmp_path, run("r2", D1), records)
    second = truth_nights(db, SHA)
    assert second != first
    assert [{k: v for k, v in n.items() if k != "updated_at"}
            for n in browse.nights(db, SHA)["nights"]] == second
    # scan_002 was replaced by an ok row, scan_004 by a failed one.
    assert second[0]["images"] == 10 and second[0]["failed"] == 1


def test_a_run_rerun_for_another_date_keeps_each_images_drop_folder(db, tmp_path):
    """A backfill clears a finished run and re-runs it for another date: its runs row (and
    settings) now describe the new night, the first night's images keep their folder."""
    rng = np.random.default_rng(3)
    load(db, tmp_path, run("manual", D2, "/drops/manual/{date}"), night_records(rng, 3))
    load(db, tmp_path, run("manual", D3, "/drops/backfill/{date}"), night_records(rng, 2))
    rows = sql(db, "SELECT drop_date, drop_dir, output_dir FROM images ORDER BY drop_date, rel_path")
    assert [(str(d)[:10], p, o) for d, p, o in rows] == (
        [(D2.isoformat(), f"/drops/manual/{D2}", f"/data/out/{D2}")] * 3
        + [(D3.isoformat(), f"/drops/backfill/{D3}", f"/data/out/{D3}")] * 2)
    some = sql(db, "SELECT id FROM images WHERE drop_date = :d", d=D2)[0][0]
    found = browse.image_file(db, some)
    assert (found.drop_dir, found.rel_path.startswith("line")) == (f"/drops/manual/{D2}", True)


# --- browse -----------------------------------------------------------------------------------

def test_models_and_nights(filled):
    models = browse.model_list(filled)
    assert [(m["sha256"], m["nights"], m["last_date"]) for m in models] in (
        [(SHA, 3, D3.isoformat()), (OTHER, 1, D3.isoformat())],
        [(OTHER, 1, D3.isoformat()), (SHA, 3, D3.isoformat())])
    got = browse.nights(filled, SHA, 30)
    assert [{k: v for k, v in n.items() if k != "updated_at"} for n in got["nights"]] == \
        truth_nights(filled, SHA)
    assert got["classes"] == ["spot", "patch", "scratch"]  # the model's, in class-id order
    # The last N nights, oldest first.
    assert [n["date"] for n in browse.nights(filled, SHA, 2)["nights"]] == [D2.isoformat(), D3.isoformat()]
    one = browse.night(filled, SHA, D3)
    want = truth_nights(filled, SHA)[-1]
    assert {k: one[k] for k in ("images", "ok", "failed", "detections", "per_class")} == \
        {k: want[k] for k in ("images", "ok", "failed", "detections", "per_class")}
    assert browse.night(filled, SHA, dt.date(2000, 1, 1)) is None


@pytest.mark.parametrize("class_name,min_conf", [(None, None), ("patch", None), (None, 0.6),
                                                 ("spot", 0.5)])
def test_night_images_by_matching_detections(filled, class_name, min_conf):
    flt = browse.ImageFilter(class_name=class_name, min_conf=min_conf)
    got = browse.night_images(filled, SHA, D3, flt, limit=500)
    truth = truth_counts(filled, "i.model_sha256 = :sha AND i.drop_date = :day", class_name, min_conf,
                         sha=SHA, day=D3)
    if flt.active:
        truth = {p: n for p, n in truth.items() if n > 0}
    assert {im["rel_path"]: im["detections"] for im in got["images"]} == truth
    assert got["total"] == len(truth)
    order = [(-im["detections"], im["rel_path"]) for im in got["images"]]
    assert order == sorted(order)
    # Pages cut the same order.
    pages = [browse.night_images(filled, SHA, D3, flt, limit=4, offset=k) for k in range(0, 16, 4)]
    assert [im["id"] for p in pages for im in p["images"]] == [im["id"] for im in got["images"]]


def test_failures_image_detail_and_file(filled):
    failures = browse.night_failures(filled, SHA, D3)
    truth = sql(filled, "SELECT rel_path, error FROM images WHERE model_sha256 = :s AND drop_date = :d "
                        "AND status = 'failed' ORDER BY rel_path", s=SHA, d=D3)
    assert [(f["rel_path"], f["error"]) for f in failures["failures"]] == truth
    assert failures["total"] == 3 and failures["failures"][0]["run_id"] == "scheduled__d3"

    image_id = browse.night_images(filled, SHA, D1)["images"][0]["id"]
    detail = browse.image_detail(filled, image_id)
    rows = sql(filled, "SELECT det_index, class_id, class_name, confidence, x1, y1, x2, y2 "
                       "FROM detections WHERE image_id = :i ORDER BY det_index", i=image_id)
    assert [tuple(d.values()) for d in detail["detections"]] == rows
    assert (detail["date"], detail["width"], detail["height"], detail["run_id"]) == \
        (D1.isoformat(), 512, 3000, "scheduled__d1")
    found = browse.image_file(filled, image_id)
    assert (found.drop_dir, found.output_dir) == (f"/data/drops/{D1}", f"/data/out/{D1}")
    assert browse.image_detail(filled, 10**9) is None and browse.image_file(filled, 10**9) is None


def test_run_overview_and_images(filled):
    got = browse.run_overview(filled, f"{DAG}/scheduled__d3")
    want = truth_nights(filled, SHA)[-1]
    [n] = got["nights"]
    assert {k: n[k] for k in ("date", "images", "ok", "failed", "per_class", "detections")} == \
        {k: want[k] for k in ("date", "images", "ok", "failed", "per_class", "detections")}
    assert got["last_load"]["images"] == 15 and got["run_id"] == "scheduled__d3"
    assert got["classes"] == ["spot", "patch", "scratch"]
    listed = browse.run_images(filled, f"{DAG}/scheduled__d3", limit=500)
    assert {im["rel_path"]: im["detections"] for im in listed["images"]} == truth_counts(
        filled, "i.run_key = :k", k=f"{DAG}/scheduled__d3")
    assert browse.run_overview(filled, f"{DAG}/never") is None
