"""The main job end to end on the embedded defaults: `make demo` (and `make demo-sliced`).

Generates a sample drop (24 synthetic 2048 x 12000 JPEGs), runs the real `nightly_detections`
DAG with `dag.test()` (SQLite metadata DB, SQLite results DB, CPU, the shipped demo model) and
prints what landed in the results database. Everything lives under ./demo and ./.airflow.

``--sliced`` (`make demo-sliced`) is the small-defect demo: 6 images with 8-48 px defects, the
shipped small-defect model, sliced inference through the same DAG (under ./demo-sliced); it
prints recall and precision against the drop's ground truth, beside a whole-image pass of the
same model on the same images, so the difference slicing makes is visible.
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
SMALL_MODEL = ROOT / "models" / "small-defects-yolo11n-320.pt"


def configure(work: Path, model: Path) -> None:
    env = {
        "AIRFLOW_HOME": str(ROOT / ".airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "YOLO_OFFLINE": "1",
        "IMAGE_ETL_DROP_DIR": str(work / "drops" / "{date}"),
        "IMAGE_ETL_OUTPUT_DIR": str(work / "outputs" / "{date}"),
        "IMAGE_ETL_DB_URL": f"sqlite:///{work / 'results.db'}",
        "IMAGE_ETL_MODEL": str(model),
        "IMAGE_ETL_DEVICES": "cpu",
        "IMAGE_ETL_SETTLE_SECONDS": "0",
    }
    for key, value in env.items():
        os.environ.setdefault(key, value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--date", default="2026-11-20")
    parser.add_argument("--count", type=int, default=None, help="images (24; sliced: 6)")
    parser.add_argument("--work", type=Path, default=None, help="./demo (sliced: ./demo-sliced)")
    parser.add_argument("--fast-decode", action="store_true")
    parser.add_argument("--sliced", action="store_true", help="the small-defect, sliced demo")
    args = parser.parse_args()
    count = args.count or (6 if args.sliced else 24)
    work = (args.work or ROOT / ("demo-sliced" if args.sliced else "demo")).resolve()
    configure(work, SMALL_MODEL if args.sliced else ROOT / "models" / "demo-yolo11n-2cls.pt")
    day = dt.date.fromisoformat(args.date)

    from image_etl import synth

    drop = work / "drops" / day.isoformat()
    defects = "small" if args.sliced else "large"
    if len(list(drop.glob("*.jpg"))) != count:
        print(f"generating {count} synthetic 2048x12000 images with {defects} defects in {drop} …",
              flush=True)
        synth.make_drop(work / "drops", day, count, defects=defects, seed=7 if args.sliced else 0)
    print("preparing the Airflow metadata DB (SQLite) …", flush=True)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True,
                   stdout=subprocess.DEVNULL)

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    if bag.import_errors:
        print(bag.import_errors, file=sys.stderr)
        return 1
    dag = bag.get_dag("nightly_detections")
    conf: dict = {"fast_decode": args.fast_decode, "reprocess": True}
    if args.sliced:
        from image_etl.model import read_model_info

        conf["slice_size"] = read_model_info(SMALL_MODEL)[1]  # the tiles it was trained on
    started = time.perf_counter()
    run = dag.test(logical_date=dt.datetime(day.year, day.month, day.day, 2, tzinfo=dt.UTC),
                   run_conf=conf)
    seconds = time.perf_counter() - started
    print(f"\nDAG run {run.run_id}: {run.state} in {seconds:.0f}s")
    if str(run.state) != "success" and getattr(run.state, "value", None) != "success":
        return 1
    status = print_summary(work, day)
    if args.sliced and status == 0:
        compare_with_whole_image(work, day)
    return status


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


def compare_with_whole_image(work: Path, day: dt.date) -> None:
    """Recall and precision of the run's (sliced) txt files against the ground truth, beside
    a whole-image pass of the same model over the same images."""
    import tempfile

    from image_etl import synth
    from image_etl.model import load_model
    from image_etl.output_paths import OutputLayout
    from image_etl.settings import InferSettings
    from image_etl.worker import ImageTask, run_shard

    drop = work / "drops" / day.isoformat()
    paths = sorted(drop.glob("*.jpg"))
    sliced_labels = work / "outputs" / day.isoformat() / "labels"
    with tempfile.TemporaryDirectory() as scratch:
        run_shard([ImageTask(p, p.name) for p in paths], load_model(SMALL_MODEL, "cpu"),
                  InferSettings(), OutputLayout(Path(scratch)))
        labels = {"whole image": Path(scratch) / "labels", "sliced": sliced_labels}
        for name, folder in labels.items():
            tp = n_pred = n_true = 0
            for p in paths:
                truth = synth.read_labels(synth.truth_path(work / "drops", day, p.name), 2048, 12000)
                preds = synth.read_labels(folder / f"{p.stem}.txt", 2048, 12000)
                tp += synth.count_matches([(b.cls, (b.x1, b.y1, b.x2, b.y2)) for b in preds], truth)
                n_pred, n_true = n_pred + len(preds), n_true + len(truth)
            print(f"  {name:<12} recall {tp / max(n_true, 1):.3f}, precision "
                  f"{tp / max(n_pred, 1):.3f} ({tp} of {n_true} defects found, {n_pred} boxes)")
        picture = work / "sliced-vs-whole.png"
        side_by_side(paths[0], {k: v / f"{paths[0].stem}.txt" for k, v in labels.items()}, picture)
        print(f"  picture:     {picture} (the same region, whole-image vs sliced boxes)")


def side_by_side(image: Path, labels: dict[str, Path], out: Path, size: int = 560) -> None:
    """The image's busiest ``size`` px square, once per set of boxes, side by side."""
    import cv2
    import numpy as np

    from image_etl import synth

    img = cv2.imread(str(image))
    h, w = img.shape[:2]
    found = {name: synth.read_labels(path, w, h) for name, path in labels.items()}
    centres = np.array([((b.x1 + b.x2) / 2, (b.y1 + b.y2) / 2) for b in found["sliced"]] or
                       [(w / 2, h / 2)])
    near = [(np.abs(centres - c) < size / 2).all(axis=1).sum() for c in centres]
    cx, cy = centres[int(np.argmax(near))]
    x0, y0 = int(np.clip(cx - size / 2, 0, w - size)), int(np.clip(cy - size / 2, 0, h - size))
    panels = []
    for name, boxes in found.items():
        panel = img[y0:y0 + size, x0:x0 + size].copy()
        for b in boxes:
            cv2.rectangle(panel, (int(b.x1) - x0, int(b.y1) - y0), (int(b.x2) - x0, int(b.y2) - y0),
                          (40, 40, 255), 2)
        cv2.rectangle(panel, (0, 0), (size, 34), (0, 0, 0), -1)
        inside = sum(1 for b in boxes if x0 <= b.x1 < x0 + size and y0 <= b.y1 < y0 + size)
        cv2.putText(panel, f"{name}: {inside} boxes here", (10, 24), cv2.FONT_HERSHEY_SIMPLEX,
                    0.7, (255, 255, 255), 2, cv2.LINE_AA)
        panels.append(panel)
    gap = np.full((size, 8, 3), 255, np.uint8)
    cv2.imwrite(str(out), np.hstack([panels[0], gap, panels[1]]))


if __name__ == "__main__":
    sys.exit(main())
