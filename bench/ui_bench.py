"""Detections page benchmark: the page's queries on a PostgreSQL holding 100 nights of results.

    .venv/bin/python bench/ui_bench.py                      # 100 nights x 12,780 images x ~10
    .venv/bin/python bench/ui_bench.py --nights 10 --reps 3 # quick
    .venv/bin/python bench/ui_bench.py --keep               # keep the filled database ...
    .venv/bin/python bench/ui_bench.py --reuse              # ... and time it again without refilling

The database is made by the store's own migrations, then filled night by night on the server
(``generate_series``: 12,780 images per night, 0-20 detections each, 10 on average, 4 classes;
1 image in 160 failed). The foreign-key triggers are off while the detections are inserted
(the rows are consistent by construction; a COPY of 128 M rows through them would take an
hour), and each night's totals are then recounted with ``store.refresh_drop_totals``, as a
load does, and timed. ``VACUUM ANALYZE`` follows, as autovacuum would.

Each query of ``image_etl.browse`` (what the page's API calls, JSON-ready) runs ``--reps``
times; the table gives the first (cold) time and the median of the others. A throwaway
database is created and dropped at the end, unless ``--keep``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR  # noqa: E402

DEFAULT_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
MODEL_SHA = hashlib.sha256(b"image_etl ui bench model").hexdigest()
NAMES = {0: "spot", 1: "patch", 2: "scratch", 3: "dent"}
FIRST_NIGHT = dt.date(2026, 1, 1)
DAG_ID = "nightly_detections"
TARGET_MS = 200


def _admin(url: str) -> Any:
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(url)
    conn = psycopg2.connect(host=u.host, port=u.port or 5432, user=u.username,
                            password=u.password, dbname=u.database or "postgres", connect_timeout=5)
    conn.autocommit = True
    return conn


def _db_url(admin_url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def _run_key(day: dt.date) -> str:
    return f"{DAG_ID}/scheduled__{day.isoformat()}T02:00:00+00:00"


# --- the fill ---------------------------------------------------------------------------------

_IMAGES_SQL = """
INSERT INTO images (model_sha256, drop_date, rel_path, run_key, bytes, width, height, status,
                    error, processed_at, drop_dir, output_dir)
SELECT %(sha)s, %(day)s, format('line%%s/scan_%%s.jpg', lpad((k / 1000)::text, 4, '0'),
                               lpad(k::text, 7, '0')),
       %(run_key)s, 2000000 + abs(hashint8(k::bigint * 7919 + %(n)s)) %% 4000000, 2048, 12000,
       CASE WHEN abs(hashint8(k::bigint + %(n)s)) %% 160 = 0 THEN 'failed' ELSE 'ok' END,
       CASE WHEN abs(hashint8(k::bigint + %(n)s)) %% 160 = 0
            THEN 'cannot decode JPEG data (corrupt or truncated)' END,
       now(), %(drop_dir)s, %(output_dir)s
FROM generate_series(0, %(count)s - 1) AS k ORDER BY 3
"""
# 0-20 detections per ok image (10 on average); class, confidence and box from hashes.
_DETECTIONS_SQL = """
INSERT INTO detections (image_id, det_index, class_id, class_name, confidence,
                        x1, y1, x2, y2, xc, yc, w, h)
SELECT i.id, g, c.cls, (%(names)s::text[])[c.cls + 1], 0.25 + 0.75 * c.u,
       c.x, c.y, c.x + 300, c.y + 200,
       (c.x + 150) / 2048.0, (c.y + 100) / 12000.0, 300 / 2048.0, 200 / 12000.0
FROM images i
CROSS JOIN LATERAL generate_series(0, abs(hashint8(i.id)) %% 21 - 1) AS g
CROSS JOIN LATERAL (SELECT abs(hashint8(i.id * 31 + g)) %% %(classes)s AS cls,
                           (abs(hashint8(i.id * 37 + g)) %% 10000) / 10000.0 AS u,
                           (abs(hashint8(i.id * 41 + g)) %% 1700)::float8 AS x,
                           (abs(hashint8(i.id * 43 + g)) %% 11700)::float8 AS y) AS c
WHERE i.model_sha256 = %(sha)s AND i.drop_date = %(day)s AND i.status = 'ok'
ORDER BY i.id, g
"""


def fill(url: str, nights: int, per_night: int) -> dict[str, Any]:
    """The store's schema (migrations), then ``nights`` nights of rows; seconds spent."""
    from image_etl import store

    engine = store.engine_from_url(url)
    store.migrate(engine)
    store.upsert_model(engine, MODEL_SHA, "/models/bench-4cls.pt", NAMES)
    names = "{" + ",".join(NAMES[k] for k in sorted(NAMES)) + "}"
    totals_s: list[float] = []
    started = time.perf_counter()
    for n in range(nights):
        day = FIRST_NIGHT + dt.timedelta(days=n)
        t0 = time.perf_counter()
        run = store.RunInfo(run_key=_run_key(day), dag_id=DAG_ID, run_id=_run_key(day).split("/")[1],
                            drop_date=day, settings={"drop_dir": f"/data/drops/{day}",
                                                     "output_dir": f"/data/outputs/bench/{day}"})
        with store.write_transaction(engine) as conn:
            store.record_empty_run(conn, run, MODEL_SHA)
            raw = conn.connection.dbapi_connection
            with raw.cursor() as cur:
                cur.execute(_IMAGES_SQL, {"sha": MODEL_SHA, "day": day, "run_key": run.run_key,
                                          "n": n, "count": per_night,
                                          "drop_dir": run.settings["drop_dir"],
                                          "output_dir": run.settings["output_dir"]})
                cur.execute("SET LOCAL session_replication_role = replica")  # no FK triggers
                cur.execute(_DETECTIONS_SQL, {"sha": MODEL_SHA, "day": day, "names": names,
                                              "classes": len(NAMES)})
                cur.execute("SET LOCAL session_replication_role = DEFAULT")
            t1 = time.perf_counter()
            store.refresh_drop_totals(conn, MODEL_SHA, day)
            totals_s.append(time.perf_counter() - t1)
        print(f"  night {n + 1}/{nights} {day}: {time.perf_counter() - t0:.1f} s "
              f"(totals {totals_s[-1] * 1000:.0f} ms)", flush=True)
    fill_s = time.perf_counter() - started
    engine.dispose()
    return {"fill_s": round(fill_s, 1), "refresh_totals_ms_median": round(
        statistics.median(totals_s) * 1000, 1) if totals_s else None}


def vacuum(admin_url: str, name: str) -> float:
    started = time.perf_counter()
    conn = _admin(_db_url(admin_url, name))
    try:
        with conn.cursor() as cur:
            cur.execute("VACUUM ANALYZE")
    finally:
        conn.close()
    return time.perf_counter() - started


# --- the timings ------------------------------------------------------------------------------

def cases(engine: Any, nights: int) -> dict[str, Callable[[], Any]]:
    from image_etl import browse

    last = FIRST_NIGHT + dt.timedelta(days=nights - 1)
    middle = FIRST_NIGHT + dt.timedelta(days=nights // 2)
    some_image = browse.night_images(engine, MODEL_SHA, middle, limit=1)["images"][0]["id"]
    return {
        "models": lambda: browse.model_list(engine),
        "nights summary (30)": lambda: browse.nights(engine, MODEL_SHA, 30),
        "nights summary (100)": lambda: browse.nights(engine, MODEL_SHA, 100),
        "night totals": lambda: browse.night(engine, MODEL_SHA, last),
        "night images (page 1)": lambda: browse.night_images(engine, MODEL_SHA, middle),
        "night images (page 50)": lambda: browse.night_images(engine, MODEL_SHA, middle,
                                                              offset=4900),
        "night images (class)": lambda: browse.night_images(
            engine, MODEL_SHA, middle, browse.ImageFilter(class_name="scratch")),
        "night images (class, conf>=0.9)": lambda: browse.night_images(
            engine, MODEL_SHA, middle, browse.ImageFilter(class_name="scratch", min_conf=0.9)),
        "night failures": lambda: browse.night_failures(engine, MODEL_SHA, middle),
        "image detail": lambda: browse.image_detail(engine, some_image),
        "run overview": lambda: browse.run_overview(engine, _run_key(middle)),
        "run images": lambda: browse.run_images(engine, _run_key(middle)),
    }


def time_cases(engine: Any, nights: int, reps: int) -> dict[str, dict[str, float]]:
    results = {}
    for name, call in cases(engine, nights).items():
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            json.dumps(call(), default=str)  # what the API does with it
            times.append((time.perf_counter() - t0) * 1000)
        warm = times[1:] or times
        results[name] = {"first_ms": round(times[0], 1), "median_ms": round(statistics.median(warm), 1),
                         "max_ms": round(max(warm), 1), "reps": reps}
    return results


def _table(results: dict[str, dict[str, float]]) -> str:
    lines = [f"{'query':34} {'first ms':>9} {'median ms':>10} {'max ms':>8}  target"]
    for name, r in results.items():
        mark = "ok" if r["median_ms"] < TARGET_MS else "SLOW"
        lines.append(f"{name:34} {r['first_ms']:9.1f} {r['median_ms']:10.1f} {r['max_ms']:8.1f}  {mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nights", type=int, default=100)
    ap.add_argument("--images", type=int, default=12_780, help="images per night")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--admin-url", default=DEFAULT_ADMIN_URL)
    ap.add_argument("--keep", action="store_true", help="keep the database (see --reuse)")
    ap.add_argument("--reuse", action="store_true", help="time a database kept by --keep")
    args = ap.parse_args(argv)
    if args.reps < 3:
        ap.error("--reps must be at least 3 (the medians leave the first, cold rep out)")

    from image_etl import store

    name = f"image_etl_ui_bench_{args.nights}x{args.images}"
    admin = _admin(args.admin_url)
    info: dict[str, Any] = {"nights": args.nights, "images_per_night": args.images,
                            "database": name, "when": dt.datetime.now(dt.UTC).isoformat()}
    try:
        with admin.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            exists = cur.fetchone() is not None
            if not (args.reuse and exists):
                cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
                cur.execute(f'CREATE DATABASE "{name}"')
                print(f"filling {name}: {args.nights} nights x {args.images:,} images ...", flush=True)
                info.update(fill(_db_url(args.admin_url, name), args.nights, args.images))
                info["vacuum_s"] = round(vacuum(args.admin_url, name), 1)
            cur.execute("SELECT pg_size_pretty(pg_database_size(%s))", (name,))
            info["database_size"] = cur.fetchone()[0]
        engine = store.engine_from_url(_db_url(args.admin_url, name))
        try:
            with engine.connect() as conn:
                info["rows"] = {t: conn.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar_one()
                                for t in ("images", "detections", "drop_totals")}
            print(f"{info['rows']['images']:,} images, {info['rows']['detections']:,} detections, "
                  f"{info['database_size']}", flush=True)
            info["results"] = time_cases(engine, args.nights, args.reps)
        finally:
            engine.dispose()
        print(_table(info["results"]))
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = RESULTS_DIR / f"ui-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
        out.write_text(json.dumps(info, indent=1) + "\n")
        print(f"results: {out}")
    finally:
        if not args.keep:
            with admin.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
