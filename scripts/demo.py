"""The main job end to end on the embedded defaults: `make demo`.

Generates a sample drop (24 synthetic 2048 x 12000 JPEGs), runs the real `nightly_detections`
DAG with `dag.test()` (SQLite metadata DB, SQLite results DB, CPU, the shipped demo model) and
prints what landed in the results database. Everything lives under ./demo and ./.airflow.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def configure(work: Path) -> None:
    env = {
        "AIRFLOW_HOME": str(ROOT / ".airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "YOLO_OFFLINE": "1",
        "IMAGE_ETL_DROP_DIR": str(work / "drops" / "{date}"),
        "IMAGE_ETL_OUTPUT_DIR": str(work / "outputs" / "{date}"),
        "IMAGE_ETL_DB_URL": f"sqlite:///{work / 'results.db'}",
        "IMAGE_ETL_DEVICES": "cpu",
        "IMAGE_ETL_SETTLE_SECONDS": "0",
    }
    for key, value in env.items():
        os.environ.setdefault(key, value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--date", default="2026-11-20")
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--work", type=Path, default=ROOT / "demo")
    parser.add_argument("--fast-decode", action="store_true")
    args = parser.parse_args()
    work = args.work.resolve()
    configure(work)
    day = dt.date.fromisoformat(args.date)

    from image_etl import synth

    drop = work / "drops" / day.isoformat()
    if len(list(drop.glob("*.jpg"))) != args.count:
        print(f"generating {args.count} synthetic 2048x12000 images in {drop} …", flush=True)
        synth.make_drop(work / "drops", day, args.count)
    print("preparing the Airflow metadata DB (SQLite) …", flush=True)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True,
                   stdout=subprocess.DEVNULL)

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    if bag.import_errors:
        print(bag.import_errors, file=sys.stderr)
        return 1
    dag = bag.get_dag("nightly_detections")
    started = time.perf_counter()
    run = dag.test(logical_date=dt.datetime(day.year, day.month, day.day, 2, tzinfo=dt.UTC),
                   run_conf={"fast_decode": args.fast_decode, "reprocess": True})
    seconds = time.perf_counter() - started
    print(f"\nDAG run {run.run_id}: {run.state} in {seconds:.0f}s")
    if str(run.state) != "success" and getattr(run.state, "value", None) != "success":
        return 1
    return print_summary(work, day)


def print_summary(work: Path, day: dt.date) -> int:
    from image_etl import store

    engine = store.engine_from_url(os.environ["IMAGE_ETL_DB_URL"])
    summary = store.drop_summary(engine, day)
    run = store.latest_run(engine, day)
    engine.dispose()
    print(f"\nresults for drop {day} (read back from {os.environ['IMAGE_ETL_DB_URL']}):")
    print(f"  images:      {summary['images']} ({summary['ok']} ok, {summary['failed']} failed)")
    print(f"  detections:  {summary['detections']} "
          + ", ".join(f"{name}={n}" for name, n in summary["per_class"].items()))
    if run and run["images_per_s"]:
        print(f"  throughput:  {run['images']} images in {run['infer_seconds']:.1f}s of inference "
              f"= {run['images_per_s']:.2f} images/s (CPU)")
    print(f"  txt files:   {work / 'outputs' / day.isoformat() / 'labels'}")
    print(f"  run files:   {work / 'outputs' / day.isoformat() / '_runs'}")
    print(f"  truth:       {work / 'drops' / 'ground_truth' / day.isoformat()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
