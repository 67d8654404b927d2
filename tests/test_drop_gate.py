"""The drop-ready gate: where it looks, the trigger's wait, and the DAG's behaviour (dag.test,
which runs a deferred task's trigger in this process). The real triggerer is in
tests/test_e2e_gate.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from pathlib import Path

import pytest

from image_etl.drop_ready import drop_gate, marker_exists
from image_etl.errors import NOT_RETRYABLE, DropNotReadyError, SettingsError

from .test_dag import _day_run, _state, _task_instances, dag, dag_env  # noqa: F401  (fixtures)

DAY = dt.date(2026, 6, 1)


def test_the_gate_looks_in_the_nights_folder_and_is_off_without_a_marker(tmp_path):
    params = {"drop_dir": str(tmp_path / "drops" / "{date}"), "drop_ready_marker": "_SUCCESS",
              "drop_wait_timeout": 90}
    gate = drop_gate(params, DAY)
    assert (gate.folder, gate.marker, gate.timeout_s, gate.on_timeout) == (
        str(tmp_path / "drops" / "2026-06-01"), "_SUCCESS", 90, "fail")
    # A manual run or backfill with ``date`` waits for that night's folder.
    assert drop_gate({**params, "date": "2026-05-03"}, DAY).folder.endswith("/2026-05-03")
    assert drop_gate({**params, "drop_date_offset_days": -1}, DAY).folder.endswith("/2026-05-31")
    assert drop_gate({**params, "drop_ready_marker": ""}, DAY).marker is None
    assert drop_gate({**params, "drop_ready_marker": None}, DAY).marker is None


def test_a_bad_param_fails_the_gate_before_any_wait(tmp_path):
    params = {"drop_dir": str(tmp_path / "{date}"), "drop_ready_marker": "_SUCCESS"}
    with pytest.raises(SettingsError, match="invalid parameter drop_ready_marker"):
        drop_gate({**params, "drop_ready_marker": "../_SUCCESS"}, DAY)
    with pytest.raises(SettingsError, match="invalid parameter drop_wait_timeout"):
        drop_gate({**params, "drop_wait_timeout": -1}, DAY)
    with pytest.raises(SettingsError, match="invalid parameter drop_wait_on_timeout"):
        drop_gate({**params, "drop_wait_on_timeout": "later"}, DAY)
    with pytest.raises(SettingsError, match="invalid parameter drop_dir"):
        drop_gate({**params, "drop_dir": "relative/{date}"}, DAY)


def test_marker_exists_once_the_file_is_there(tmp_path):
    assert not marker_exists(str(tmp_path / "not-yet"), "_SUCCESS")  # the folder may come later
    assert not marker_exists(str(tmp_path), "manifest.json")
    (tmp_path / "manifest.json").write_text("{}")
    assert marker_exists(str(tmp_path), "manifest.json")


async def _first_event(trigger):
    async for event in trigger.run():
        return event.payload


def test_the_trigger_fires_when_the_marker_appears_and_at_its_deadline(tmp_path):
    from image_etl_airflow.drop_gate import DropReadyTrigger

    folder = tmp_path / "2026-06-01"
    threading.Timer(0.6, lambda: (folder.mkdir(), (folder / "_SUCCESS").write_text(""))).start()
    started = time.monotonic()
    trigger = DropReadyTrigger(str(folder), "_SUCCESS", time.time() + 30, poll_s=0.1)
    assert asyncio.run(_first_event(trigger)) == {"status": "ready"}
    assert 0.5 < time.monotonic() - started < 10
    late = DropReadyTrigger(str(tmp_path / "never"), "_SUCCESS", time.time() + 0.3, poll_s=0.1)
    assert asyncio.run(_first_event(late)) == {"status": "timeout"}
    # What the triggerer stores and rebuilds: the same wait, the same absolute deadline.
    path, kwargs = late.serialize()
    assert path == "image_etl_airflow.drop_gate.DropReadyTrigger"
    assert DropReadyTrigger(**kwargs).deadline == late.deadline


def test_not_ready_is_not_retried():
    assert DropNotReadyError in NOT_RETRYABLE


def test_the_dag_fails_naming_folder_and_marker_when_the_marker_never_comes(dag, dag_env, capfd):  # noqa: F811
    db, conf, tmp = dag_env
    folder = tmp / "gate" / DAY.isoformat()
    folder.mkdir(parents=True)
    conf = {**conf, "drop_dir": str(tmp / "gate" / "{date}"), "drop_ready_marker": "_SUCCESS",
            "drop_wait_timeout": 1}
    run = _day_run(dag, conf, DAY)
    assert _state(run) == "failed"
    tis = _task_instances(run)
    assert _state(tis["wait_for_drop"]) == "failed" and tis["wait_for_drop"].try_number == 1
    assert _state(tis["discover"]) == "upstream_failed"
    out = capfd.readouterr().out
    assert f"drop not ready: the marker '_SUCCESS' did not appear in {folder} within " \
           "drop_wait_timeout=1s" in out
    assert not Path(db.removeprefix("sqlite:///")).exists()  # nothing listed, nothing loaded


def test_the_dag_proceeds_after_the_wait_when_told_to(dag, dag_env, capfd):  # noqa: F811
    db, conf, tmp = dag_env
    (tmp / "gate" / DAY.isoformat()).mkdir(parents=True)
    conf = {**conf, "drop_dir": str(tmp / "gate" / "{date}"), "drop_ready_marker": "_SUCCESS",
            "drop_wait_timeout": 1, "drop_wait_on_timeout": "proceed"}
    run = _day_run(dag, conf, DAY)
    assert _state(run) == "success"
    out = capfd.readouterr().out
    assert "Pausing task as DEFERRED" in out  # it waited in a trigger, not in the worker
    assert "did not appear" in out and "going on (drop_wait_on_timeout=proceed)" in out
    assert _state(_task_instances(run)["discover"]) == "success"
