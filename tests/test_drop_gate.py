"""The drop-ready gate: where it looks, the trigger's wait, and the DAG's behaviour (dag.test,
which runs a deferred task's trigger in this process). The real triggerer is in
tests/test_e2e_airflow.py; the gate on a bucket through the DAG in tests/test_s3_dag.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import time
from pathlib import Path

import pytest

from image_etl.drop_ready import drop_gate, marker_exists
from image_etl.errors import NOT_RETRYABLE, DropNotReadyError, SettingsError
from image_etl.storage import StorageAccessError

from .test_dag import _day_run, _state, _task_instances, dag, dag_env  # noqa: F401  (fixtures)
from .test_storage_airflow import _aws_conn

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


def test_the_gate_on_a_bucket_keeps_the_urls_connection():
    gate = drop_gate({"drop_dir": "s3://night_store@line-scan/drops/{date}",
                      "output_dir": "s3://night_store@line-scan/out", "drop_ready_marker": "_SUCCESS",
                      "drop_wait_timeout": 60}, DAY)
    assert gate.folder == "s3://night_store@line-scan/drops/2026-06-01"  # where the trigger looks
    assert "did not appear in s3://line-scan/drops/2026-06-01 within" in gate.not_ready()


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
    started = time.monotonic()  # before the timer starts: a late start would shorten the wait
    threading.Timer(0.6, lambda: (folder.mkdir(), (folder / "_SUCCESS").write_text(""))).start()
    trigger = DropReadyTrigger(str(folder), "_SUCCESS", time.time() + 30, poll_s=0.1)
    assert asyncio.run(_first_event(trigger)) == {"status": "ready"}
    assert 0.5 < time.monotonic() - started < 10
    late = DropReadyTrigger(str(tmp_path / "never"), "_SUCCESS", time.time() + 0.3, poll_s=0.1)
    assert asyncio.run(_first_event(late)) == {"status": "timeout"}
    # What the triggerer stores and rebuilds: the same wait, the same absolute deadline.
    path, kwargs = late.serialize()
    assert path == "image_etl_airflow.drop_gate.DropReadyTrigger"
    assert DropReadyTrigger(**kwargs).deadline == late.deadline


def _bucket_conn(monkeypatch, s3_server, secret: str | None = None, **extra) -> None:
    """The connection ``gate_store`` to the test server (its endpoint unless ``extra`` says)."""
    _aws_conn(monkeypatch, "gate_store", s3_server.key, secret or s3_server.secret,
              **{"endpoint_url": s3_server.endpoint_url, "region_name": s3_server.region,
                 **extra})


def test_the_trigger_waits_on_a_bucket_through_the_urls_connection(s3_server, monkeypatch):
    """The trigger stores the URL only; in the triggerer it resolves the URL's connection
    (key, secret, endpoint) and looks in the bucket."""
    from image_etl_airflow.drop_gate import DropReadyTrigger

    _bucket_conn(monkeypatch, s3_server)
    bucket = s3_server.new_bucket()
    folder = f"s3://gate_store@{bucket}/nights/2026-06-01"
    client = s3_server.client()
    threading.Timer(0.6, lambda: client.put_object(
        Bucket=bucket, Key="nights/2026-06-01/_SUCCESS", Body=b"")).start()
    trigger = DropReadyTrigger(folder, "_SUCCESS", time.time() + 30, poll_s=0.1)
    assert asyncio.run(_first_event(trigger)) == {"status": "ready"}
    assert s3_server.secret not in json.dumps(trigger.serialize())


def test_the_trigger_ends_at_once_on_refused_credentials_or_a_missing_bucket(s3_server,
                                                                              monkeypatch):
    from image_etl_airflow.drop_gate import DropReadyTrigger, _raise_storage_error

    wrong = "not-the-secret-of-this-bucket-17"
    _bucket_conn(monkeypatch, s3_server, secret=wrong)
    bucket = s3_server.new_bucket()
    started = time.monotonic()
    event = asyncio.run(_first_event(DropReadyTrigger(f"s3://gate_store@{bucket}/n", "_SUCCESS",
                                                      time.time() + 60, poll_s=0.1)))
    assert event["status"] == "error" and event["error"] == "StorageAccessError", event
    assert f"s3://{bucket}/n/_SUCCESS: access denied" in event["message"]
    assert wrong not in json.dumps(event)
    assert time.monotonic() - started < 30  # not the 60 s deadline
    with pytest.raises(StorageAccessError, match="access denied") as raised:
        _raise_storage_error(event)  # what the deferred task does with the event
    assert isinstance(raised.value, NOT_RETRYABLE)

    _bucket_conn(monkeypatch, s3_server)
    event = asyncio.run(_first_event(DropReadyTrigger("s3://gate_store@no-such-bucket-9q/n",
                                                      "_SUCCESS", time.time() + 60, poll_s=0.1)))
    assert (event["status"], event["error"]) == ("error", "BucketNotFoundError"), event
    assert "bucket 'no-such-bucket-9q' does not exist" in event["message"]


def test_the_trigger_keeps_looking_past_an_unreachable_endpoint(s3_server, monkeypatch):
    """A storage endpoint that does not answer (a restart, a network blip) is not the end of
    the wait: the trigger logs it and looks again until its deadline."""
    import socket

    from image_etl_airflow.drop_gate import DropReadyTrigger

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    _bucket_conn(monkeypatch, s3_server, endpoint_url=f"http://127.0.0.1:{port}")
    event = asyncio.run(_first_event(DropReadyTrigger("s3://gate_store@drops/n", "_SUCCESS",
                                                      time.time() + 2, poll_s=0.5)))
    assert event == {"status": "timeout"}


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
