"""DB load benchmark: the store's COPY path vs a plain SQLAlchemy ``insert()`` executemany.

    .venv/bin/python bench/db_bench.py                    # 100k and 1M detection rows
    .venv/bin/python bench/db_bench.py --rows 100000      # quick

Both methods start from the same staging files (what the infer tasks leave behind) and end
at COMMIT, with the same idempotent replace: loading the same images again replaces their rows.

- ``copy``: ``image_etl.store.load_staged``: images COPYed into a temp table and upserted
  set-based (ids kept), their old detections deleted, the new detections COPYed straight into
  ``detections`` in COPY's binary format (the doubles the staging lines hold).
- ``executemany``: what one would write with SQLAlchemy Core alone, in one transaction:
  delete the old detections and images of those (model, date, rel_path)s, then
  ``conn.execute(insert(images).returning(id), rows)`` and ``conn.execute(insert(detections),
  rows)``.

Each size is loaded twice per method: ``first`` into empty tables, ``reload`` over the rows
just loaded (the replace path). A throwaway database (``bench_<random>``) is created on the
server and dropped at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA_DIR, RESULTS_DIR, machine_info  # noqa: E402

DEFAULT_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
MODEL_SHA = hashlib.sha256(b"image_etl bench model").hexdigest()
NAMES = {0: "spot", 1: "patch"}
DROP_DATE = dt.date(2026, 1, 1)
IMAGE_W, IMAGE_H = 2048, 12000
_DELETE_CHUNK = 5_000


# --- staging files --------------------------------------------------------------------------

def staging_files(rows: int, dets_per_image: int, shards: int) -> list[Path]:
    """Staging files holding ``rows`` detection rows (cached under bench/data/db/)."""
    from image_etl.staging import StagingWriter, image_record

    folder = DATA_DIR / "db" / f"rows{rows}-per{dets_per_image}-shards{shards}"
    paths = [folder / f"shard-{k:02d}.jsonl" for k in range(shards)]
    done = folder / "complete"
    if done.is_file() and all(p.is_file() for p in paths):
        return paths
    import numpy as np

    print(f"writing staging files for {rows:,} detection rows under {folder} ...", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(rows)
    images = -(-rows // dets_per_image)
    for k, path in enumerate(paths):
        writer = StagingWriter(path, "bench", {"model_sha256": MODEL_SHA,
                                               "model_path": "/models/bench.pt", "imgsz": 640,
                                               "device": "cpu"})
        path.unlink(missing_ok=True)
        writer.resume()
        for i in range(k, images, shards):
            n = dets_per_image if i < images - 1 else rows - dets_per_image * (images - 1)
            dets = _random_dets(rng, n)
            writer.append(image_record(f"line{i // 1000:04d}/scan_{i:07d}.jpg", status="ok",
                                       bytes_=int(rng.integers(2_000_000, 6_000_000)),
                                       width=IMAGE_W, height=IMAGE_H, error=None, dets=dets))
        writer.close()
    _check_rows(paths, rows)
    done.write_text("ok\n")
    return paths


def _random_dets(rng: Any, n: int) -> Any:
    """``n`` plausible detection rows (DET_FIELDS: cls conf x1 y1 x2 y2 xc yc w h), float32."""
    import numpy as np

    x1 = rng.uniform(0, IMAGE_W - 600, n)
    y1 = rng.uniform(0, IMAGE_H - 600, n)
    w = rng.uniform(200, 560, n)
    h = rng.uniform(200, 560, n)
    cls = rng.integers(0, 2, n).astype(np.float64)
    conf = rng.uniform(0.25, 1.0, n)
    table = np.stack([cls, conf, x1, y1, x1 + w, y1 + h, (x1 + w / 2) / IMAGE_W,
                      (y1 + h / 2) / IMAGE_H, w / IMAGE_W, h / IMAGE_H], 1)
    return table.astype(np.float32)  # what the worker stages: float32 values from the device


def _check_rows(paths: list[Path], rows: int) -> None:
    from image_etl.staging import read_staging

    total = sum(len(r["detections"]) for p in paths for r in read_staging(p)[1])
    if total != rows:
        raise RuntimeError(f"staging files hold {total} detection rows, expected {rows}")


# --- the two load methods -------------------------------------------------------------------

def load_copy(engine: Any, files: list[Path], run: Any) -> tuple[int, int]:
    from image_etl.store import load_staged

    report = load_staged(engine, files, run, NAMES)
    return report.images, report.detections


def load_executemany(engine: Any, files: list[Path], run: Any) -> tuple[int, int]:
    """Plain SQLAlchemy Core: delete the old rows of these images, then insert() executemany."""
    from sqlalchemy import delete, insert, select
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    from image_etl.staging import DET_FIELDS, read_staging
    from image_etl.store import detections, images, runs, upsert_model, write_transaction

    now = dt.datetime.now(dt.UTC)
    image_rows: list[dict[str, Any]] = []
    det_rows: dict[str, list[dict[str, Any]]] = {}
    for path in files:
        _, records = read_staging(path)
        for r in records:
            image_rows.append({"model_sha256": MODEL_SHA, "drop_date": run.drop_date,
                               "rel_path": r["rel_path"], "run_key": run.run_key,
                               "bytes": r["bytes"], "width": r["width"], "height": r["height"],
                               "status": r["status"], "error": r["error"], "processed_at": now})
            rows = []
            for i, d in enumerate(r["detections"]):
                row = dict(zip(DET_FIELDS, d))
                cls = int(row.pop("cls"))
                row["confidence"] = row.pop("conf")
                rows.append({"det_index": i, "class_id": cls, "class_name": NAMES[cls], **row})
            det_rows[r["rel_path"]] = rows
    paths = [r["rel_path"] for r in image_rows]
    with write_transaction(engine) as conn:
        upsert_model(conn, MODEL_SHA, "/models/bench.pt", NAMES)
        run_row = {"run_key": run.run_key, "dag_id": run.dag_id, "run_id": run.run_id,
                   "drop_date": run.drop_date, "model_sha256": MODEL_SHA, "settings": "{}",
                   "loaded_at": now, "images": len(image_rows), "ok": len(image_rows),
                   "failed": 0, "detections": sum(map(len, det_rows.values())),
                   "infer_seconds": 0.0, "images_per_s": None}
        stmt = pg_insert(runs).values(**run_row)
        conn.execute(stmt.on_conflict_do_update(
            index_elements=[runs.c.run_key],
            set_={k: stmt.excluded[k] for k in run_row if k != "run_key"}))
        for start in range(0, len(paths), _DELETE_CHUNK):
            chunk = paths[start:start + _DELETE_CHUNK]
            old = select(images.c.id).where(images.c.model_sha256 == MODEL_SHA,
                                            images.c.drop_date == run.drop_date,
                                            images.c.rel_path.in_(chunk))
            conn.execute(delete(detections).where(detections.c.image_id.in_(old)))
            conn.execute(delete(images).where(images.c.model_sha256 == MODEL_SHA,
                                              images.c.drop_date == run.drop_date,
                                              images.c.rel_path.in_(chunk)))
        ids = conn.execute(insert(images).returning(images.c.id, images.c.rel_path,
                                                    sort_by_parameter_order=True),
                           image_rows).all()
        flat = [{"image_id": image_id, **row} for image_id, rel in ids for row in det_rows[rel]]
        if flat:
            conn.execute(insert(detections), flat)
    return len(image_rows), len(flat)


METHODS = {"copy": load_copy, "executemany": load_executemany}


# --- the run --------------------------------------------------------------------------------

def _admin(url: str) -> Any:
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(url)
    conn = psycopg2.connect(host=u.host, port=u.port or 5432, user=u.username,
                            password=u.password, dbname=u.database or "postgres",
                            connect_timeout=5)
    conn.autocommit = True
    return conn


def _counts(engine: Any) -> tuple[int, int]:
    from sqlalchemy import func, select

    from image_etl.store import detections, images

    with engine.connect() as conn:
        n_images = conn.execute(select(func.count()).select_from(images)).scalar_one()
        n_dets = conn.execute(select(func.count()).select_from(detections)).scalar_one()
    return n_images, n_dets


def _reset(engine: Any) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE detections, images, runs RESTART IDENTITY CASCADE")
    _quiesce(engine)


def _quiesce(engine: Any) -> None:
    """Flush the previous load's dirty pages so it does not bill the next one (superuser)."""
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("CHECKPOINT")


def measure(engine: Any, method: str, files: list[Path], rows: int, rep: int
            ) -> list[dict[str, Any]]:
    from image_etl.store import RunInfo

    out = []
    _reset(engine)
    for phase in ("first", "reload"):
        run = RunInfo(run_key=f"bench/{method}-{rows}-{rep}", dag_id="bench",
                      run_id=f"{method}-{rows}-{rep}", drop_date=DROP_DATE, settings={})
        t0 = time.perf_counter()
        n_images, n_dets = METHODS[method](engine, files, run)
        seconds = time.perf_counter() - t0
        in_db = _counts(engine)
        if in_db != (n_images, n_dets) or n_dets != rows:
            raise RuntimeError(f"{method} {phase}: loaded {n_images} images / {n_dets} detections,"
                               f" the database holds {in_db}, expected {rows} detections")
        out.append({"method": method, "rows": rows, "phase": phase, "rep": rep,
                    "images": n_images, "detections": n_dets, "seconds": seconds,
                    "det_rows_per_s": n_dets / seconds,
                    "all_rows_per_s": (n_dets + n_images) / seconds})
        print(f"  {method:<11} {phase:<6} {rows:>9,} rows  {seconds:7.2f}s  "
              f"{n_dets / seconds:>10,.0f} detection rows/s", flush=True)
        _quiesce(engine)
    return out


def fk_cost(engine: Any, rows: int) -> dict[str, Any]:
    """What the foreign key ``detections.image_id → images.id`` costs PostgreSQL alone.

    The rows the loads left are dumped as COPY text once, then COPYed back (no Python in the
    timed part) into ``detections`` (emptied first; its images stay) and into a copy of it
    made with ``LIKE ... INCLUDING ALL``, which has the same columns, primary key and checks
    but no foreign key. Each load is one transaction, timed to COMMIT.
    """
    import io

    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        dump = io.BytesIO()
        cur.copy_expert("COPY detections TO STDOUT", dump)
        raw.commit()
        if dump.getbuffer().nbytes == 0:
            raise RuntimeError("fk_cost: detections is empty; run a load first")
        cur.execute("CREATE TABLE detections_without_fk (LIKE detections INCLUDING ALL)")
        raw.commit()
        seconds = {}
        for table in ("detections", "detections_without_fk"):
            cur.execute(f"TRUNCATE {table}")
            raw.commit()
            dump.seek(0)
            t0 = time.perf_counter()
            cur.copy_expert(f"COPY {table} FROM STDIN", dump)
            raw.commit()
            seconds[table] = time.perf_counter() - t0
            cur.execute(f"SELECT count(*) FROM {table}")
            if cur.fetchone()[0] != rows:
                raise RuntimeError(f"fk_cost: {table} does not hold {rows} rows")
        cur.execute("DROP TABLE detections_without_fk")
        raw.commit()
    finally:
        raw.close()
    with_fk, without = seconds["detections"], seconds["detections_without_fk"]
    return {"rows": rows, "with_fk_s": with_fk, "without_fk_s": without,
            "with_fk_rows_per_s": rows / with_fk, "without_fk_rows_per_s": rows / without,
            "fk_share_of_copy": 1 - without / with_fk}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="100000,1000000",
                   help="comma list of detection-row counts (default 100000,1000000)")
    p.add_argument("--dets-per-image", type=int, default=10)
    p.add_argument("--shards", type=int, default=4, help="staging files (one per worker)")
    p.add_argument("--reps", type=int, default=1, help="repetitions (median reported)")
    p.add_argument("--methods", default="copy,executemany")
    p.add_argument("--fk-cost", choices=("yes", "no"), default="yes",
                   help="also time PostgreSQL alone COPYing the loaded rows with and without "
                        "the detections → images foreign key (default yes)")
    p.add_argument("--admin-url", default=DEFAULT_ADMIN_URL,
                   help="a maintenance database on the server; a throwaway one is made beside it")
    p.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    args.rows = [int(r.replace("_", "")) for r in str(args.rows).split(",")]
    args.methods = args.methods.split(",")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    import statistics

    from sqlalchemy.engine import make_url

    from image_etl.store import engine_from_url, migrate, redact_url

    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = _admin(args.admin_url)
    with admin.cursor() as cur:
        cur.execute("SHOW server_version")
        server = cur.fetchone()[0]
        cur.execute(f'CREATE DATABASE "{name}" ENCODING \'UTF8\' TEMPLATE template0')
    url = make_url(args.admin_url).set(database=name).render_as_string(hide_password=False)
    print(f"PostgreSQL {server}, throwaway database {name} ({redact_url(url)})")
    results: list[dict[str, Any]] = []
    fk_costs: list[dict[str, Any]] = []
    engine = None
    try:
        engine = engine_from_url(url)
        migrate(engine)
        for i, rows in enumerate(args.rows):
            files = staging_files(rows, args.dets_per_image, args.shards)
            for rep in range(1, args.reps + 1):
                order = args.methods if (i + rep) % 2 else args.methods[::-1]
                for method in order:
                    results.extend(measure(engine, method, files, rows, rep))
            if args.fk_cost == "yes":
                fk_costs.append(fk_cost(engine, rows))
                _quiesce(engine)
    finally:
        if engine is not None:
            engine.dispose()
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

    summary = []
    for rows in args.rows:
        for phase in ("first", "reload"):
            line: dict[str, Any] = {"rows": rows, "phase": phase}
            for method in args.methods:
                got = [r for r in results if (r["rows"], r["phase"], r["method"]) ==
                       (rows, phase, method)]
                line[method] = statistics.median(r["det_rows_per_s"] for r in got)
                line[f"{method}_s"] = statistics.median(r["seconds"] for r in got)
            if "copy" in line and "executemany" in line:
                line["ratio"] = line["copy"] / line["executemany"]
            summary.append(line)

    print()
    print(f"{'rows':>9} {'phase':<7} {'COPY rows/s':>12} {'executemany rows/s':>19} {'ratio':>7}")
    for line in summary:
        print(f"{line['rows']:>9,} {line['phase']:<7} {line.get('copy', float('nan')):>12,.0f} "
              f"{line.get('executemany', float('nan')):>19,.0f} "
              f"{line.get('ratio', float('nan')):>6.1f}x")
    print("  detection rows per second, from staging files to COMMIT (images rows come along: "
          f"1 per {args.dets_per_image} detections)")
    goal = [line["ratio"] for line in summary if "ratio" in line]
    if goal:
        status = "PASS" if min(goal) >= 10 else "MISS"
        print(f"target: {status}  COPY load >= 10x the executemany baseline "
              f"(lowest ratio {min(goal):.1f}x)")

    for cost in fk_costs:
        print(f"PostgreSQL alone, COPY of the same {cost['rows']:,} rows as text: "
              f"{cost['with_fk_rows_per_s']:,.0f} rows/s into detections, "
              f"{cost['without_fk_rows_per_s']:,.0f} rows/s into a copy without its foreign key "
              f"(the per-row check is {cost['fk_share_of_copy']:.0%} of the COPY)")

    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"db-{started.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        "started": started.isoformat(), "finished": dt.datetime.now(dt.UTC).isoformat(),
        "command": [sys.executable, *sys.argv], "machine": machine_info("cpu"),
        "server": f"PostgreSQL {server}", "dets_per_image": args.dets_per_image,
        "shards": args.shards, "results": results, "summary": summary, "fk_cost": fk_costs,
        "target": {"goal": "copy >= 10x executemany", "lowest_ratio": min(goal) if goal else None},
    }, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
