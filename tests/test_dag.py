"""The DAG: parses cleanly and cheaply, has the agreed shape, and runs end to end (dag.test)."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest

from image_etl import synth

from .conftest import DEMO_MODEL, DROP_DATE, ROOT
from .dbrows import result_rows as _rows
from .test_worker import match

PARAM_NAMES = {"date", "drop_dir", "output_dir", "model_path", "devices", "imgsz", "conf", "iou",
               "batch_size", "fast_decode", "save_annotated", "reprocess"}


@pytest.fixture(scope="module")
def dag(airflow_home):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.get_dag("nightly_detections")


def test_dag_shape(dag):
    assert {t.task_id for t in dag.tasks} == {"discover", "partition", "infer", "load", "report"}
    assert PARAM_NAMES <= set(dag.params)
    assert dag.catchup is False
    assert dag.timetable.expression == "0 2 * * *"
    infer = dag.get_task("infer")
    assert infer.queue == "gpu" and infer.pool == "gpu" and infer.retries >= 1
    assert infer.map_index_template == "{{ shard_label }}"
    load = dag.get_task("load")
    assert [o.name for o in load.outlets] == ["image_etl_detections"] and load.retries >= 1
    assert dag.get_task("discover").downstream_task_ids == {"partition", "load", "report"}
    assert all(dag.params.get_param(n).schema.get("title") for n in PARAM_NAMES)


def test_dag_file_imports_nothing_heavy(airflow_home):
    code = ("import runpy, sys; runpy.run_path(sys.argv[1]); "
            "print(sorted(m for m in ('torch', 'ultralytics', 'cv2', 'PIL', "
            "'image_etl.worker') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "dags/nightly_detections.py")],
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.fixture()
def dag_env(tmp_path, full_drop, monkeypatch):
    """Point the DAG at the session's full-size drop and a fresh results DB."""
    db = f"sqlite:///{tmp_path / 'results.db'}"
    monkeypatch.setenv("IMAGE_ETL_DB_URL", db)
    conf = {"drop_dir": str(full_drop / "{date}"), "output_dir": str(tmp_path / "out" / "{date}"),
            "devices": "cpu,cpu", "settle_seconds": 0, "batch_size": 4,
            "model_path": str(DEMO_MODEL)}
    return db, conf, tmp_path


def _test_run(dag, conf: dict, day: dt.date):
    run = dag.test(logical_date=dt.datetime(day.year, day.month, day.day, 2, tzinfo=dt.UTC),
                   run_conf=conf)
    assert str(getattr(run.state, "value", run.state)) == "success"
    return run


@pytest.mark.slow
def test_dag_end_to_end_is_idempotent(dag, dag_env, full_drop):
    db, conf, tmp = dag_env
    _test_run(dag, conf, DROP_DATE)
    first = _rows(db)
    images = sorted(p.name for p in (full_drop / DROP_DATE.isoformat()).glob("*.jpg"))
    assert [r[1] for r in first["images"]] == images
    assert all(r[3] == "ok" for r in first["images"])
    assert {d[4] for d in first["detections"]} == {"spot", "patch"}  # the model's class names

    # The DB equals the txt files, image by image and detection by detection.
    labels = tmp / "out" / DROP_DATE.isoformat() / "labels"
    by_image: dict[str, list[tuple]] = {}
    for d in first["detections"]:
        by_image.setdefault(d[1], []).append(d)
    for name in images:
        lines = [list(map(float, line.split())) for line in
                 (labels / Path(name).with_suffix(".txt")).read_text().splitlines()]
        rows = by_image.get(name, [])
        assert len(lines) == len(rows), name
        for line, row in zip(lines, rows):
            assert int(line[0]) == row[3]
            assert line[1:] == pytest.approx([row[10], row[11], row[12], row[13], row[5]], rel=1e-5,
                                             abs=1e-6)

    # ... and it matches the ground truth.
    tp = n_true = n_pred = 0
    for name in images:
        truth = synth.read_labels(synth.truth_path(full_drop, DROP_DATE, name), 2048, 12000)
        preds = [(r[3], (r[6], r[7], r[8], r[9])) for r in by_image.get(name, [])]
        tp += match(preds, [(b.cls, (b.x1, b.y1, b.x2, b.y2)) for b in truth])
        n_true += len(truth)
        n_pred += len(preds)
    assert tp / n_true >= 0.9 and tp / n_pred >= 0.9

    # Same date again: nothing new to process, the same rows.
    _test_run(dag, conf, DROP_DATE)
    assert _rows(db) == first
    # Reprocess: everything is redone and replaced, not duplicated.
    _test_run(dag, {**conf, "reprocess": True}, DROP_DATE)
    assert _rows(db) == first

    # Another date adds only its own rows.
    other = DROP_DATE + dt.timedelta(days=1)
    synth.make_drop(full_drop, other, 2, width=1024, height=6000, seed=5)
    _test_run(dag, conf, other)
    after = _rows(db)
    assert [r for r in after["images"] if r[0] == str(DROP_DATE)] == first["images"]
    assert sorted(r[1] for r in after["images"] if r[0] == str(other)) == ["scan_00000.jpg",
                                                                           "scan_00001.jpg"]


@pytest.mark.slow
def test_empty_drop_is_a_successful_visibly_empty_run(dag, dag_env, caplog):
    db, conf, tmp = dag_env
    empty = tmp / "empty" / "2026-01-01"
    empty.mkdir(parents=True)
    _test_run(dag, {**conf, "drop_dir": str(tmp / "empty" / "{date}")}, dt.date(2026, 1, 1))
    assert _rows(db) == {"images": [], "detections": []}
    assert "0 images" in caplog.text


def test_bad_param_is_refused_before_any_work(dag, dag_env):
    db, conf, tmp = dag_env
    day = DROP_DATE
    run = dag.test(logical_date=dt.datetime(day.year, day.month, day.day, 2, tzinfo=dt.UTC),
                   run_conf={**conf, "model_path": "relative/model.pt"})
    assert str(getattr(run.state, "value", run.state)) == "failed"
    assert not (tmp / "out").exists()
