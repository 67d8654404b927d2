"""The DAG: parses cleanly and cheaply, has the agreed shape, and runs end to end (dag.test)."""

from __future__ import annotations

import contextlib
import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest

from image_etl import synth
from image_etl.settings import DAG_PARAMS, SETTINGS

from .conftest import DEMO_MODEL, DROP_DATE, ROOT
from .dbrows import result_rows as _rows
from .helpers import bad_cases, match
from .pg import pg_url  # noqa: F401  (session fixture: a fresh PostgreSQL database)

PARAM_NAMES = set(DAG_PARAMS)


@pytest.fixture()
def dag(airflow_home):
    """The DAG as the DAG file defines it, parsed afresh for each test (a quarter of a second):
    dag.test() runs the tasks in this process, on this object, so no test inherits another's."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.get_dag("nightly_detections")


def test_dag_shape(dag):
    assert {t.task_id for t in dag.tasks} == {"wait_for_drop", "discover", "partition", "infer",
                                             "load", "report"}
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
    # Fail-fast: every task fails at once on an error no retry can fix, and has a time limit.
    from image_etl import errors

    for t in dag.tasks:
        assert t.execution_timeout is not None, t.task_id
        for exc in (errors.SettingsError("x", "y"), errors.WeightsChangedError("w"),
                    errors.MissingStagingError("m"), errors.TooManyFailedError("t")):
            assert t.retry_policy.evaluate(exc, 1, 3).action.value == "fail", (t.task_id, exc)
        assert t.retry_policy.evaluate(OSError(28, "disk full"), 1, 3).action.value == "default"
    assert not any(getattr(t, "multiple_outputs", False) for t in dag.tasks)


def test_trigger_form_shows_the_documented_defaults_and_bounds(airflow_home, monkeypatch):
    """The form and REST, as the DAG file builds them with no IMAGE_ETL_* set: the params the
    README documents, in its order, with its defaults; each number and size takes the README's
    bounds and refuses a step past them (sizes as N and as HxW alike)."""
    import re

    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import ParamValidationError

    from .test_settings_bounds import readme_settings

    for spec in SETTINGS.values():
        if spec.env:
            monkeypatch.delenv(spec.env, raising=False)
    dag = DagBag(dag_folder=str(ROOT / "dags")).get_dag("nightly_detections")
    documented = {n: row for n, row in readme_settings().items() if row["section"] != "engine only"}
    assert list(dag.params) == list(documented) == list(DAG_PARAMS)
    for name, row in documented.items():
        param = dag.params.get_param(name)
        value = param.value
        shown = ("empty" if value is None else str(value).lower() if isinstance(value, bool)
                 else str(Path(value).relative_to(ROOT)) if name == "model_path" else str(value))
        assert shown == row["default"], name
        bounds = re.search(r"(-?[\d.]+) to (-?[\d.]+)", row["allowed"])
        if bounds is None:
            continue
        lo, hi = (float(b) if "." in b else int(b) for b in bounds.groups())
        step = 0.001 if param.schema["type"] == "number" else 1
        for inside in (lo, hi):
            param.resolve(inside)
        for outside in (round(lo - step, 6), round(hi + step, 6)):
            with pytest.raises(ParamValidationError):
                param.resolve(outside)
        if "HEIGHTxWIDTH" in row["allowed"]:
            param.resolve(f"{lo}x{hi}")
            for outside in (f"{lo - 1}x{hi}", f"{lo}x{hi + 1}"):
                with pytest.raises(ParamValidationError):
                    param.resolve(outside)
    # The examples: a number and the same HxW are alike.
    dag.params.get_param("imgsz").resolve(12000)
    dag.params.get_param("imgsz").resolve("12000x2048")
    for tiny in (1, "1x2"):
        with pytest.raises(ParamValidationError):
            dag.params.get_param("slice_size").resolve(tiny)
    devices = dag.params.get_param("devices")
    for good in ("auto", "cpu", "cpu,cpu", "0,1", "cuda:0,cuda:1", " cuda:0 , 1 "):
        devices.resolve(good)
    for bad in ("gpu7", "", "cpu;rm", "0,,1", "cuda0"):
        with pytest.raises(ParamValidationError, match="devices|pattern|does not match|short"):
            devices.resolve(bad)


def test_run_date_without_a_logical_date_is_when_it_was_triggered():
    """REST and CLI triggers default to no logical date; the run's date is then run_after's,
    in the DAG's timezone."""
    import importlib.util
    import types

    import pendulum

    spec = importlib.util.spec_from_file_location("nightly_dag", ROOT / "dags/nightly_detections.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    late = dt.datetime(2026, 11, 19, 23, 30, tzinfo=dt.UTC)  # a plain datetime, as Airflow gives
    tokyo = types.SimpleNamespace(timezone=pendulum.timezone("Asia/Tokyo"))
    utc = types.SimpleNamespace(timezone=pendulum.timezone("UTC"))
    no_logical = {"logical_date": None, "dag_run": types.SimpleNamespace(run_after=late)}
    assert module._run_date({**no_logical, "dag": utc}) == dt.date(2026, 11, 19)
    assert module._run_date({**no_logical, "dag": tokyo}) == dt.date(2026, 11, 20)
    logical = pendulum.datetime(2026, 11, 18, 2)
    assert module._run_date({"logical_date": logical, "dag": utc,
                             "dag_run": types.SimpleNamespace(run_after=late)}) == dt.date(2026, 11, 18)


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


def _day_run(dag, conf: dict, day: dt.date):
    """dag.test() for one drop date; the DAG's params are as before afterwards.

    dag.test() runs the tasks in this process on these very task objects, and Airflow's
    process_params() merges the run conf into each task's own Param objects (Param.resolve keeps
    the value). Without the restore a conf value such as ``reprocess: True`` would carry over
    into every later run of this DAG object, though its conf never asked for it.
    """
    params = [p for owner in (dag, *dag.tasks) for p in owner.params.values()]
    saved = [p.value for p in params]
    try:
        return dag.test(logical_date=dt.datetime(day.year, day.month, day.day, 2, tzinfo=dt.UTC),
                        run_conf=conf)
    finally:
        for param, value in zip(params, saved):
            param.value = value


@contextlib.contextmanager
def _immediate_retries(dag, retries: int = 1):
    """Every task retries ``retries`` times, each at once: dag.test() would otherwise sleep
    through the DAG's real retry delays and back-off (minutes) before a run can fail."""
    attrs = ("retries", "retry_delay", "retry_exponential_backoff")
    saved = [(task, {a: getattr(task, a) for a in attrs}) for task in dag.tasks]
    for task in dag.tasks:
        task.retries, task.retry_delay, task.retry_exponential_backoff = (
            retries, dt.timedelta(0), 0)
    try:
        yield
    finally:
        for task, values in saved:
            for attr, value in values.items():
                setattr(task, attr, value)


def _state(obj) -> str:
    return str(getattr(obj.state, "value", obj.state))


def _task_instances(run) -> dict:
    """task_id → TaskInstance of a finished run (unmapped tasks)."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter_by(run_id=run.run_id).all()
        session.expunge_all()
    return {ti.task_id: ti for ti in tis}


def _xcom_keys(run) -> list[str]:
    import sqlite3

    from .conftest import AIRFLOW_HOME

    meta = sqlite3.connect(AIRFLOW_HOME / "airflow.db")
    try:
        return [k for (k,) in meta.execute("SELECT key FROM xcom WHERE run_id = ?", (run.run_id,))]
    finally:
        meta.close()


def _test_run(dag, conf: dict, day: dt.date):
    run = _day_run(dag, conf, day)
    assert _state(run) == "success"
    return run


@pytest.mark.slow
def test_dag_end_to_end_is_idempotent(dag, dag_env, full_drop, capfd):
    db, conf, tmp = dag_env
    run = _test_run(dag, conf, DROP_DATE)
    logs = "".join(capfd.readouterr())
    # load fetches the shards' results in one request, so Airflow logs no failed XCom lookup.
    assert "XCom not found" not in logs
    # Each infer task's time limit is sized to its shard (15 min + 5 s per image).
    assert logs.count("infer time limit: 0:15:50 for 10 image(s)") == 2, logs[-3000:]
    # One XCom per task instance: no task's dict is split into one row per key.
    assert _xcom_keys(run) == ["return_value"] * 6
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
def test_drop_date_offset_for_drops_named_by_capture_day(dag, dag_env, full_drop):
    """The run of D+1 02:00 with offset -1 processes drop D; an explicit date wins over both."""
    db, conf, tmp = dag_env
    day = dt.date(2026, 5, 1)
    synth.make_drop(tmp / "capture", day, 1, width=512, height=3000, seed=51)
    conf = {**conf, "drop_dir": str(tmp / "capture" / "{date}"), "drop_date_offset_days": -1}
    _test_run(dag, conf, day + dt.timedelta(days=1))
    assert [(r[0], r[1]) for r in _rows(db)["images"]] == [("2026-05-01", "scan_00000.jpg")]
    # Offset 0 (today's behaviour) on the same tick looks for drop D+1, which is not there.
    run = _day_run(dag, {**conf, "drop_date_offset_days": 0}, day + dt.timedelta(days=1))
    assert _state(run) == "failed"
    assert _state(_task_instances(run)["discover"]) == "failed"
    explicit = _day_run(dag, {**conf, "date": day.isoformat(), "reprocess": True}, day + dt.timedelta(days=9))
    assert _state(explicit) == "success"


def _xcom_values(run, task_id: str) -> list:
    import json
    import sqlite3

    from .conftest import AIRFLOW_HOME

    meta = sqlite3.connect(AIRFLOW_HOME / "airflow.db")
    try:
        rows = meta.execute("SELECT value FROM xcom WHERE run_id = ? AND task_id = ?",
                            (run.run_id, task_id)).fetchall()
    finally:
        meta.close()
    return [json.loads(v) for (v,) in rows]


@pytest.mark.slow
def test_run_throughput_counts_inference_not_the_model_load(dag, dag_env, tmp_path):
    """The run's inference seconds (and so its images/s, in the demo and the UI) start when
    the shard's first image does: loading the model is reported beside them, not in them."""
    from image_etl import store

    db, conf, _ = dag_env
    day = dt.date(2026, 5, 20)
    synth.make_drop(tmp_path, day, 1, width=512, height=3000, seed=52)
    run = _test_run(dag, {**conf, "drop_dir": str(tmp_path / "{date}")}, day)
    [shard] = _xcom_values(run, "infer")
    assert shard["model_load_s"] > 0
    engine = store.engine_from_url(db)
    try:
        recorded = store.latest_run(engine, day)
    finally:
        engine.dispose()
    assert recorded is not None
    assert shard["seconds"] - 0.01 <= recorded["infer_seconds"] < shard["seconds"] + shard["model_load_s"]


@pytest.mark.slow
def test_empty_drop_is_a_successful_visibly_empty_run(dag, dag_env, caplog):
    db, conf, tmp = dag_env
    empty = tmp / "empty" / "2026-01-01"
    empty.mkdir(parents=True)
    _test_run(dag, {**conf, "drop_dir": str(tmp / "empty" / "{date}")}, dt.date(2026, 1, 1))
    assert _rows(db) == {"images": [], "detections": []}
    assert "this run loaded 0 image(s) (0 ok, 0 failed), 0 detection(s) (nothing new in the drop)" \
        in caplog.text


def test_bad_param_is_refused_before_any_work(dag, dag_env, capfd):
    db, conf, tmp = dag_env
    run = _day_run(dag, {**conf, "model_path": "relative/model.pt"}, DROP_DATE)
    assert _state(run) == "failed"
    assert not (tmp / "out").exists()
    assert "invalid parameter model_path: must be an absolute path" in capfd.readouterr().out
    discover = _task_instances(run)["discover"]
    assert discover.try_number == 1 and _state(discover) == "failed"  # not retried


# --- Hostile drops, allowed roots and secrets, through the whole DAG -----------------------------

@pytest.mark.slow
def test_bad_input_through_the_dag(dag, dag_env, tmp_path):
    """Every odd file: processed, or one failed row with its reason, or a documented skip."""
    import os
    import time

    db, conf, _ = dag_env
    day = dt.date(2026, 2, 3)
    drop = tmp_path / "bad" / day.isoformat()
    (drop / "folder.jpg").mkdir(parents=True)  # a directory named like an image: walked into
    outside = tmp_path / "outside.jpg"  # a symlink target outside the drop: never read
    good = bad_cases()["name with spaces 'quotes' \"double\" é漢字.jpg"][0]
    outside.write_bytes(good)
    for name, (data, _) in bad_cases().items():
        (drop / name).write_bytes(data)
    (drop / "folder.jpg" / "inside.jpg").write_bytes(good)
    (drop / "link-outside.jpg").symlink_to(outside)
    (drop / ".partial-upload.jpg").write_bytes(good[:100])  # uploader temp file: hidden, skipped
    old = time.time() - 3600
    for path in drop.rglob("*"):
        os.utime(path, (old, old), follow_symlinks=False)
    (drop / "uploading.jpg").write_bytes(good[: len(good) // 2])  # still being written

    conf = {**conf, "drop_dir": str(tmp_path / "bad" / "{date}"), "settle_seconds": 60,
            "max_failed_fraction": 0.5}
    run = _day_run(dag, conf, day)
    assert _state(run) == "success"
    rows = {r[1]: r for r in _rows(db)["images"]}
    expected = {**{n: e for n, (_, e) in bad_cases().items()}, "folder.jpg/inside.jpg": None}
    assert sorted(rows) == sorted(expected)  # no link, no hidden file, no unsettled file
    labels = Path(conf["output_dir"].format(date=day.isoformat())) / "labels"
    for name, reason in expected.items():
        status, error = rows[name][3], rows[name][4]
        txt = labels / Path(name).with_suffix(".txt")
        if reason is None:
            assert (status, error) == ("ok", None), name
            assert txt.is_file(), name
        else:
            assert status == "failed" and reason in error, (name, error)
            assert not txt.exists(), name
    out_root = labels.parent
    assert not [p for p in out_root.rglob("*") if ".tmp" in p.name]
    assert not (out_root / "labels" / "link-outside.txt").exists()

    # The upload finishes: the next run picks up that file alone and keeps everything else.
    (drop / "uploading.jpg").write_bytes(good)
    os.utime(drop / "uploading.jpg", (old, old))
    before = _rows(db)
    assert _state(_day_run(dag, conf, day)) == "success"
    after = _rows(db)
    assert sorted(r[1] for r in after["images"]) == sorted([*rows, "uploading.jpg"])
    assert [r for r in after["images"] if r[1] != "uploading.jpg"] == before["images"]


def test_paths_outside_the_allowed_roots_are_refused_before_any_work(airflow_home, dag_env,
                                                                     monkeypatch, tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    db, conf, _ = dag_env
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    monkeypatch.setenv("IMAGE_ETL_ALLOWED_ROOTS", f"{allowed}:{DEMO_MODEL.parent}")
    bag = DagBag(dag_folder=str(ROOT / "dags"))  # the roots are read when the DAG file is parsed
    guarded = bag.get_dag("nightly_detections")
    # The session drop lies outside the allowed roots; so does "../" out of an allowed one.
    for bad in (conf, {**conf, "output_dir": str(allowed / ".." / "escape" / "{date}")}):
        run = _day_run(guarded, bad, DROP_DATE)
        assert _state(run) == "failed"
        assert not (tmp_path / "out").exists() and not (tmp_path / "escape").exists()
    assert not Path(db.removeprefix("sqlite:///")).exists()  # refused before touching the DB
    assert _state(_task_instances(run)["discover"]) == "failed"


def _assert_not_in_metadata_db(secret: str, db: Path) -> None:
    """``secret`` is in no text or blob of any table of Airflow's SQLite metadata DB."""
    import sqlite3

    meta = sqlite3.connect(db)
    try:
        tables = [r[0] for r in meta.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in meta.execute(f'SELECT * FROM "{table}"'):  # noqa: S608 (from sqlite_master)
                text = " ".join(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                                for v in row)
                assert secret not in text, table
    finally:
        meta.close()


@pytest.mark.slow
def test_db_password_never_leaves_the_connection(dag, dag_env, request, monkeypatch, capfd,
                                                 caplog):
    """Through a failing and a succeeding run: not in logs, XCom, run files, DB rows or summary."""
    results_url = request.getfixturevalue("pg_url")
    import sqlite3

    import sqlalchemy as sa

    from .conftest import AIRFLOW_HOME

    _, conf, tmp = dag_env
    secret = "s3cr3t-Pa55-" + tmp.name[-6:]
    url = sa.engine.make_url(results_url).set(drivername="postgresql", password=secret)
    day = dt.date(2026, 3, 4)
    synth.make_drop(tmp / "pw", day, 2, width=512, height=3000, seed=11)
    conf = {**conf, "drop_dir": str(tmp / "pw" / "{date}")}

    # Unreachable DB (nothing listens on port 1): the run fails and says why, without the secret.
    # The first task to reach the DB (discover) fails, after one retry taken at once.
    monkeypatch.setenv("AIRFLOW_CONN_IMAGE_ETL_DB",
                       url.set(port=1).render_as_string(hide_password=False))
    with _immediate_retries(dag):
        failed = _day_run(dag, conf, day)
    assert _state(failed) == "failed"
    discover = _task_instances(failed)["discover"]
    assert _state(discover) == "failed" and discover.try_number == 2
    failed_logs = capfd.readouterr().out + caplog.text
    assert "127.0.0.1" in failed_logs and "***" in failed_logs
    # Checked now: the next dag.test() of this date deletes the failed run and its rows.
    _assert_not_in_metadata_db(secret, AIRFLOW_HOME / "airflow.db")

    monkeypatch.setenv("AIRFLOW_CONN_IMAGE_ETL_DB", url.render_as_string(hide_password=False))
    run = _day_run(dag, conf, day)
    assert _state(run) == "success"
    logs = failed_logs + capfd.readouterr().out + caplog.text
    assert "loaded 2 image(s)" in logs and secret not in logs

    # Every text and blob in Airflow's metadata DB (XCom, rendered fields, run conf, ...).
    meta = sqlite3.connect(AIRFLOW_HOME / "airflow.db")
    xcoms = meta.execute("SELECT count(*) FROM xcom WHERE run_id = ?", (run.run_id,)).fetchone()[0]
    meta.close()
    assert xcoms >= 4
    _assert_not_in_metadata_db(secret, AIRFLOW_HOME / "airflow.db")
    # Run files (manifest, shards, staging, reports) and every results-DB row.
    out = Path(conf["output_dir"].format(date=day.isoformat()))
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    engine = sa.create_engine(results_url)
    with engine.connect() as conn:
        for table in ("runs", "images", "detections", "models"):
            dump = str(conn.execute(sa.text(f"SELECT * FROM {table}")).all())  # noqa: S608
            assert secret not in dump, table
        assert conn.execute(sa.text("SELECT count(*) FROM images")).scalar() == 2
    engine.dispose()


@pytest.mark.slow
def test_a_mostly_failed_drop_fails_the_run_but_keeps_its_rows(dag, dag_env, tmp_path):
    db, conf, _ = dag_env
    day = dt.date(2026, 2, 4)
    drop = tmp_path / "mostly-bad" / day.isoformat()
    drop.mkdir(parents=True)
    for name in ("truncated.jpg", "zero.jpg", "text.jpg", "gray.jpg"):
        (drop / name).write_bytes(bad_cases()[name][0])
    conf = {**conf, "drop_dir": str(tmp_path / "mostly-bad" / "{date}")}
    run = _day_run(dag, {**conf, "max_failed_fraction": 0.5}, day)
    assert _state(run) == "failed"
    tis = _task_instances(run)
    assert _state(tis["load"]) == "success" and _state(tis["report"]) == "failed"
    assert tis["report"].try_number == 1  # not retried: the counts would not change
    rows = _rows(db)["images"]
    assert sorted((r[1], r[3]) for r in rows) == [("gray.jpg", "ok"), ("text.jpg", "failed"),
                                                  ("truncated.jpg", "failed"), ("zero.jpg", "failed")]
    # The same drop with a tolerant threshold is a green run; the rows stay the same.
    assert _state(_day_run(dag, {**conf, "max_failed_fraction": 0.8}, day)) == "success"
    assert _rows(db)["images"] == rows
