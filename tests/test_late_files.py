"""Every image of every night, exactly once: late files caught up into their own night, the
result identity (model + result settings), and a report that accounts for every file.

Real parts: the shipped demo model on CPU, real files with real mtimes, a real SQLite file
(and the DAG through ``dag.test()`` for the two-nights-in-a-row acceptance test).
"""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from image_etl import nights, stages, store, synth
from image_etl.discover import list_images

from .conftest import DEMO_MODEL, ROOT
from .pg import pg_url  # noqa: F401  (session fixture: a fresh PostgreSQL database)

D = dt.date(2026, 4, 10)  # dates of their own: these rows never meet other tests' rows
DAG_ID = "nightly_detections"
SETTLE_S = 600.0
LONG_AGO = time.time() - 3 * 3600


def make_night(root: Path, day: dt.date, n: int, seed: int) -> list[str]:
    """``n`` small images of night ``day``, all written long ago (settled); their names."""
    paths = synth.make_drop(root, day, n, width=512, height=3000, seed=seed)
    for path in paths:
        os.utime(path, (LONG_AGO, LONG_AGO))
    return sorted(p.name for p in paths)


def still_writing(path: Path) -> None:
    now = time.time()
    os.utime(path, (now, now))


def finished_writing(path: Path) -> None:
    os.utime(path, (LONG_AGO, LONG_AGO))


def params(root: Path, out: Path, **extra) -> dict:
    return {"drop_dir": str(root / "{date}"), "output_dir": str(out / "{date}"),
            "model_path": str(DEMO_MODEL), "devices": "cpu", "settle_seconds": SETTLE_S,
            "batch_size": 2, **extra}


def run_night(conf: dict, day: dt.date, db_url: str, run_id: str) -> tuple[dict, dict, dict]:
    """discover → partition → infer → load → report, as the DAG's tasks call them."""
    found = stages.discover(conf, run_id=run_id, run_date=day, db_url=db_url)
    results = [stages.infer(shard) for shard in stages.partition(found)]
    loaded = stages.load(found, results, db_url=db_url, dag_id=DAG_ID)
    return found, loaded, stages.report(found, loaded, db_url=db_url)


def image_rows(db_url: str) -> list[tuple]:
    """(night, rel_path, status, result_key, caught_up, run_key) of every image row."""
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT drop_date, rel_path, status, result_key, caught_up, run_key FROM images "
                "ORDER BY drop_date, rel_path")).all()
    finally:
        engine.dispose()
    return [(str(r[0])[:10], r[1], r[2], r[3], bool(r[4]), r[5]) for r in rows]


def accounting(db_url: str, day: dt.date) -> dict:
    engine = store.engine_from_url(db_url)
    try:
        with engine.connect() as conn:
            return store.night_accounting(conn, _sha(), day)
    finally:
        engine.dispose()


def _sha() -> str:
    from image_etl.model import weights_sha256

    return weights_sha256(DEMO_MODEL)


@pytest.fixture
def db(db_url) -> str:
    """A results DB: a SQLite file, then a PostgreSQL schema (conftest's db_url)."""
    return db_url


# --- late files ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_late_file_is_caught_up_into_its_own_night_exactly_once(tmp_path, db):
    root, out = tmp_path / "drops", tmp_path / "out"
    d1 = D + dt.timedelta(days=1)
    first = make_night(root, D, 3, seed=101)
    second = make_night(root, d1, 2, seed=102)
    late = root / D.isoformat() / first[-1]
    still_writing(late)
    conf = params(root, out)

    found, _, report = run_night(conf, D, db, "run-D")
    assert found["images"] == 2 and found["unsettled"] == 1
    assert report["night"]["unsettled_names"] == [first[-1]]
    assert (report["night"]["listed"], report["night"]["ok"]) == (2, 2)

    finished_writing(late)
    found, loaded, report = run_night(conf, d1, db, "run-D1")
    assert found["late"] == {D.isoformat(): 1}
    assert loaded["caught_up"] == {D.isoformat(): {"images": 1, "ok": 1, "failed": 0}}
    assert report["caught_up"] == loaded["caught_up"]
    rows = image_rows(db)
    assert [(r[0], r[1]) for r in rows] == [(D.isoformat(), n) for n in first] + [
        (d1.isoformat(), n) for n in second]
    assert [r[4] for r in rows] == [False, False, True, False, False]  # the late one, caught up
    assert rows[2][5] == f"{DAG_ID}/run-D1"
    # Its txt went to its own night's output folder.
    assert (out / D.isoformat() / "labels" / Path(first[-1]).with_suffix(".txt")).is_file()
    night = accounting(db, D)
    assert (night["listed"], night["ok"], night["unsettled"], night["caught_up"]) == (3, 3, 0, 1)
    assert night["checked_by"] == f"{DAG_ID}/run-D1"
    # The Detections page shows the same numbers for the night.
    from image_etl import browse

    engine = store.engine_from_url(db)
    try:
        page = browse.night(engine, _sha(), D)["files"]
    finally:
        engine.dispose()
    assert {k: page[k] for k in ("listed", "ok", "failed", "caught_up", "unsettled",
                                 "unsettled_names", "checked_by_run", "mixed_settings")} == {
        "listed": 3, "ok": 3, "failed": 0, "caught_up": 1, "unsettled": 0, "unsettled_names": [],
        "checked_by_run": "run-D1", "mixed_settings": False}

    # The next night's run finds nothing late: exactly once.
    make_night(root, d1 + dt.timedelta(days=1), 1, seed=103)
    found, loaded, _ = run_night(conf, d1 + dt.timedelta(days=1), db, "run-D2")
    assert found["late"] == {} and loaded["caught_up"] == {}
    assert image_rows(db)[:5] == rows


@pytest.mark.slow
def test_a_night_whose_only_file_was_still_being_written_is_caught_up(tmp_path, db):
    """Night D's run loads nothing (its one image is unsettled) yet records that it ran, so the
    next night's look-back finds the image and loads it into D."""
    root, out = tmp_path / "drops", tmp_path / "out"
    [name] = make_night(root, D, 1, seed=110)
    make_night(root, D + dt.timedelta(days=1), 1, seed=111)
    still_writing(root / D.isoformat() / name)
    found, loaded, report = run_night(params(root, out), D, db, "run-D")
    assert (found["images"], loaded["images"], report["night"]["unsettled_names"]) == (0, 0, [name])
    finished_writing(root / D.isoformat() / name)
    _, loaded, _ = run_night(params(root, out), D + dt.timedelta(days=1), db, "run-D1")
    assert loaded["caught_up"] == {D.isoformat(): {"images": 1, "ok": 1, "failed": 0}}
    assert [(r[0], r[1], r[4]) for r in image_rows(db)] == [
        (D.isoformat(), name, True), ((D + dt.timedelta(days=1)).isoformat(), "scan_00000.jpg", False)]


def test_look_back_is_off_without_date_in_the_drop_folder_and_with_zero_nights(tmp_path, db):
    """No {date}: every night is the same folder, which the run lists already; 0 nights: off."""
    from image_etl.run_settings import RunSettings

    root = tmp_path / "drops"
    make_night(root, D, 1, seed=104)
    engine = store.engine_from_url(db)
    store.migrate(engine)
    sha = _sha()
    files = {"listed": 0, "unsettled": 1, "unsettled_names": ["x.jpg"], "skipped_links": 0,
             "skipped_unknown": 0, "skipped_hidden": 0}
    store.record_night_files(engine, sha, D, "r", files)  # night D ran
    try:
        for conf, expected in (({"drop_dir": str(root / "{date}")}, 1),
                               ({"drop_dir": str(root / D.isoformat())}, 0),
                               ({"drop_dir": str(root / "{date}"), "catchup_nights": 0}, 0)):
            conf = {**params(root, tmp_path / "out"), **conf}
            settings = RunSettings.from_params(conf, D + dt.timedelta(days=1), model_sha256=sha)
            found = nights.look_back(conf, settings, run_date=D + dt.timedelta(days=1),
                                     allowed_roots=(), sha=sha, engine=engine)
            assert sum(len(n.todo) for n in found) == expected, conf
    finally:
        engine.dispose()


# --- result identity -------------------------------------------------------------------------------

@pytest.mark.slow
def test_other_result_settings_process_the_night_again_and_a_mixed_night_says_so(tmp_path, db,
                                                                              caplog):
    root, out = tmp_path / "drops", tmp_path / "out"
    names = make_night(root, D, 3, seed=105)
    late = root / D.isoformat() / names[0]
    still_writing(late)
    make_night(root, D + dt.timedelta(days=1), 1, seed=106)
    conf = params(root, out)
    run_night(conf, D, db, "run-a")
    keys = {r[3] for r in image_rows(db)}
    assert len(keys) == 1 and None not in keys

    # The next night's run has another conf: D's late file gets it, so D mixes two settings.
    finished_writing(late)
    run_night({**conf, "conf": 0.3}, D + dt.timedelta(days=1), db, "run-b")
    night = accounting(db, D)
    assert night["mixed_settings"] and sorted(s["images"] for s in night["settings"]) == [1, 2]
    assert {s["settings"]["conf"] for s in night["settings"]} == {0.25, 0.3}

    # Re-running D with conf 0.3 (no reprocess) is no longer a no-op: the two other images are
    # processed again, their rows replaced (not added), and the log and the report say so.
    with caplog.at_level("INFO"):
        found, loaded, report = run_night({**conf, "conf": 0.3, "date": D.isoformat()},
                                          D + dt.timedelta(days=5), db, "run-c")
    assert (found["images"], found["other_settings"], loaded["images"]) == (2, 2, 2)
    assert report["reprocessed_for_settings"] == 2
    assert "were loaded with other result settings" in caplog.text
    rows = [r for r in image_rows(db) if r[0] == D.isoformat()]
    assert [r[1] for r in rows] == names and len({r[3] for r in rows}) == 1
    assert not accounting(db, D)["mixed_settings"]
    # Same settings again: nothing to do.
    found, _, _ = run_night({**conf, "conf": 0.3, "date": D.isoformat()}, D, db, "run-d")
    assert found["images"] == 0


def test_the_result_key_names_the_settings_that_change_detections():
    from image_etl.identity import result_key, result_settings
    from image_etl.settings import InferSettings

    base = result_settings(InferSettings())
    assert base == {"imgsz": None, "conf": 0.25, "iou": 0.7}
    same = [InferSettings(batch_size=32), InferSettings(decode_workers=3),
            InferSettings(save_annotated=True), InferSettings(slice_overlap=0.5)]  # not sliced
    assert {result_key(result_settings(s)) for s in same} == {result_key(base)}
    other = [InferSettings(conf=0.3), InferSettings(iou=0.5), InferSettings(imgsz=1280),
             InferSettings(slice_size=640), InferSettings(precision="fp32"),
             InferSettings(fast_decode=True), InferSettings(max_det=10)]
    keys = {result_key(result_settings(s)) for s in other}
    assert len(keys) == len(other) and result_key(base) not in keys
    assert (result_key(result_settings(InferSettings(slice_size=640, slice_overlap=0.5)))
            != result_key(result_settings(InferSettings(slice_size=640))))


# --- a report that accounts for every file -----------------------------------------------------

def test_the_listing_counts_every_file_it_does_not_read(tmp_path):
    root = tmp_path / "night"
    make_night(tmp_path, D, 2, seed=107)
    folder = tmp_path / D.isoformat()
    folder.rename(root)
    (root / "notes.txt").write_text("x")
    (root / ".upload.jpg.part").write_text("x")
    (root / ".cache").mkdir()
    (root / "link.jpg").symlink_to(next(root.glob("*.jpg")))
    listing = list_images(root, settle_s=SETTLE_S)
    assert (len(listing.images), listing.skipped_links, listing.skipped_unknown,
            listing.skipped_hidden) == (2, ["link.jpg"], 1, 2)


@pytest.mark.slow
def test_two_nightly_runs_in_a_row_load_every_image_of_both_nights_exactly_once(
        tmp_path, airflow_home, monkeypatch):
    """Acceptance: the DAG runs night D (one file still being written), then night D+1; every
    image of both nights has exactly one row, the late one in night D."""
    from airflow.dag_processing.dagbag import DagBag

    db = f"sqlite:///{tmp_path / 'results.sqlite'}"
    monkeypatch.setenv("IMAGE_ETL_DB_URL", db)
    dag = DagBag(dag_folder=str(ROOT / "dags")).get_dag(DAG_ID)
    root, out = tmp_path / "drops", tmp_path / "out"
    day0, day1 = dt.date(2026, 4, 20), dt.date(2026, 4, 21)
    first = make_night(root, day0, 3, seed=108)
    second = make_night(root, day1, 2, seed=109)
    late = root / day0.isoformat() / first[1]
    conf = params(root, out)

    def nightly(day: dt.date) -> str:
        run = dag.test(logical_date=dt.datetime(day.year, day.month, day.day, 2, tzinfo=dt.UTC),
                       run_conf=conf)
        return str(getattr(run.state, "value", run.state))

    still_writing(late)
    assert nightly(day0) == "success"
    assert [r[1] for r in image_rows(db)] == [first[0], first[2]]
    finished_writing(late)
    assert nightly(day1) == "success"
    rows = image_rows(db)
    assert [(r[0], r[1]) for r in rows] == sorted(
        [(day0.isoformat(), n) for n in first] + [(day1.isoformat(), n) for n in second])
    assert all(r[2] == "ok" for r in rows)
    assert [r[1] for r in rows if r[4]] == [first[1]]
