"""A night on object storage through the real DAG (dag.test()): the drop and the outputs in
SeaweedFS buckets (tests/s3.py), reached through an ``aws`` Airflow connection from an
``AIRFLOW_CONN_*`` variable with ``endpoint_url`` in its extra, as a deployment would set it.

Every image is loaded once; labels, staging and run files land in the output bucket; the
connection's key and secret appear in no log, XCom, metadata row, results-DB row, run file or
output object. Bad credentials and a missing bucket fail discover at once (not retried) with
one line naming the bucket; a prefix with no objects is a successful, empty night.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3

import pytest
import sqlalchemy as sa

from image_etl import synth

from .conftest import AIRFLOW_HOME, DEMO_MODEL
from .dbrows import result_rows
from .test_dag import (  # noqa: F401  (dag: the DAG fixture)
    _assert_not_in_metadata_db,
    _day_run,
    _immediate_retries,
    _state,
    _task_instances,
    dag,
)

DAY = dt.date(2026, 9, 14)
CONN = "seaweed_store"


def _aws_conn(monkeypatch, s3_server, secret: str | None = None) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN.upper()}", json.dumps(
        {"conn_type": "aws", "login": s3_server.key, "password": secret or s3_server.secret,
         "extra": {"endpoint_url": s3_server.endpoint_url, "region_name": s3_server.region}}))


def _objects(s3_server, bucket: str, prefix: str = "") -> dict[str, bytes]:
    client = s3_server.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix) for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


@pytest.fixture
def night(s3_server, tmp_path, monkeypatch):
    """A drop of 6 images in one bucket, an empty output bucket, a fresh results DB."""
    db = f"sqlite:///{tmp_path / 'results.db'}"
    monkeypatch.setenv("IMAGE_ETL_DB_URL", db)
    synth.make_drop(tmp_path / "drops", DAY, 6, width=512, height=3000, seed=914)
    drop_bucket, out_bucket = s3_server.new_bucket(), s3_server.new_bucket()
    client = s3_server.client()
    folder = tmp_path / "drops" / DAY.isoformat()
    names = sorted(p.name for p in folder.glob("*.jpg"))
    for name in names:
        client.upload_file(str(folder / name), drop_bucket, f"nights/{DAY}/{name}")
    conf = {"drop_dir": f"s3://{CONN}@{drop_bucket}/nights/{{date}}",
            "output_dir": f"s3://{CONN}@{out_bucket}/out/{{model}}/{{date}}",
            "devices": "cpu,cpu", "settle_seconds": 0, "batch_size": 2,
            "model_path": str(DEMO_MODEL)}
    return {"db": db, "conf": conf, "drop": drop_bucket, "out": out_bucket, "names": names}


@pytest.mark.slow
def test_a_night_from_a_bucket_to_a_bucket_keeps_the_secrets(dag, night, s3_server, monkeypatch,  # noqa: F811
                                                             capfd, caplog):
    _aws_conn(monkeypatch, s3_server)
    run = _day_run(dag, night["conf"], DAY)
    logs = "".join(capfd.readouterr()) + caplog.text
    assert _state(run) == "success", logs[-3000:]

    rows = result_rows(night["db"])
    assert [r[1] for r in rows["images"]] == night["names"]  # every image once, all ok
    assert all(r[3] == "ok" for r in rows["images"])

    out = _objects(s3_server, night["out"])
    labels = sorted(k.rsplit("/", 1)[1] for k in out if "/labels/" in k)
    assert labels == [n.replace(".jpg", ".txt") for n in night["names"]]
    run_files = [k for k in out if "/_runs/" in k]
    staged = [k for k in run_files if k.endswith(".staged.jsonl")]
    assert len(staged) == 2 and any(k.endswith("/manifest.json") for k in run_files)
    staged_images = sorted(json.loads(line)["rel_path"] for k in staged
                           for line in out[k].decode().splitlines()[1:])
    assert staged_images == night["names"]
    # The DB's detections are the label objects' lines, image by image.
    per_image: dict[str, int] = {}
    for d in rows["detections"]:
        per_image[d[1]] = per_image.get(d[1], 0) + 1
    for key, body in out.items():
        if "/labels/" in key:
            name = key.rsplit("/", 1)[1].replace(".txt", ".jpg")
            assert len(body.decode().splitlines()) == per_image.get(name, 0), key

    # The recorded folders are URLs without credentials (the connection id at most).
    engine = sa.create_engine(night["db"])
    with engine.connect() as conn:
        settings = json.loads(conn.execute(sa.text("SELECT settings FROM runs")).scalar_one())
        dump = " ".join(str(conn.execute(sa.text(f"SELECT * FROM {t}")).all())  # noqa: S608
                        for t in ("runs", "images", "detections", "models"))
    engine.dispose()
    assert settings["drop_dir"] == f"s3://{CONN}@{night['drop']}/nights/{DAY}"

    meta = sqlite3.connect(AIRFLOW_HOME / "airflow.db")
    xcoms = [v for (v,) in meta.execute("SELECT value FROM xcom WHERE run_id = ?", (run.run_id,))]
    meta.close()
    assert len(xcoms) >= 6
    for secret in (s3_server.secret, s3_server.key):
        assert secret not in logs
        assert secret not in dump
        assert all(secret not in str(x) for x in xcoms)
        for key, body in out.items():
            assert secret.encode() not in body, key
        _assert_not_in_metadata_db(secret, AIRFLOW_HOME / "airflow.db")


@pytest.mark.slow
def test_bad_credentials_fail_discover_once_naming_the_bucket(dag, night, s3_server,  # noqa: F811
                                                              monkeypatch, capfd, caplog):
    wrong = "wrong-secret-for-the-bucket-42"
    _aws_conn(monkeypatch, s3_server, secret=wrong)
    with _immediate_retries(dag):
        run = _day_run(dag, night["conf"], DAY)
    logs = "".join(capfd.readouterr()) + caplog.text
    assert _state(run) == "failed"
    discover = _task_instances(run)["discover"]
    assert _state(discover) == "failed" and discover.try_number == 1  # not retried
    assert f"s3://{night['drop']}/nights/{DAY}: access denied" in logs
    assert wrong not in logs and s3_server.secret not in logs
    _assert_not_in_metadata_db(wrong, AIRFLOW_HOME / "airflow.db")


@pytest.mark.slow
def test_missing_bucket_and_empty_prefix(dag, night, s3_server, monkeypatch, capfd, caplog):  # noqa: F811
    _aws_conn(monkeypatch, s3_server)
    conf = {**night["conf"], "drop_dir": f"s3://{CONN}@no-such-bucket-7x/nights/{{date}}"}
    with _immediate_retries(dag):
        run = _day_run(dag, conf, DAY)
    logs = "".join(capfd.readouterr()) + caplog.text
    assert _state(run) == "failed"
    assert _task_instances(run)["discover"].try_number == 1
    assert "bucket 'no-such-bucket-7x' does not exist" in logs

    empty = {**night["conf"], "drop_dir": f"s3://{CONN}@{night['drop']}/nothing/{{date}}"}
    run = _day_run(dag, empty, DAY + dt.timedelta(days=1))
    assert _state(run) == "success"
    assert "this run loaded 0 image(s)" in "".join(capfd.readouterr()) + caplog.text
    assert result_rows(night["db"]) == {"images": [], "detections": []}


@pytest.mark.slow
def test_the_drop_gate_waits_on_the_bucket_through_the_urls_connection(dag, night, s3_server,  # noqa: F811
                                                                        monkeypatch, capfd, caplog):
    """No marker: the trigger (its connection resolved in the trigger, dag.test runs it here)
    looks in the bucket until the deadline and fails naming the prefix; with the marker
    written, the next run passes the gate at once and processes the night."""
    _aws_conn(monkeypatch, s3_server)
    conf = {**night["conf"], "drop_ready_marker": "_SUCCESS", "drop_wait_timeout": 1}
    run = _day_run(dag, conf, DAY)
    logs = "".join(capfd.readouterr()) + caplog.text
    assert _state(run) == "failed"
    assert "Pausing task as DEFERRED" in logs
    assert (f"drop not ready: the marker '_SUCCESS' did not appear in "
            f"s3://{night['drop']}/nights/{DAY} within drop_wait_timeout=1s") in logs

    s3_server.client().put_object(Bucket=night["drop"], Key=f"nights/{DAY}/_SUCCESS", Body=b"")
    run = _day_run(dag, conf, DAY)
    logs = "".join(capfd.readouterr()) + caplog.text
    assert _state(run) == "success", logs[-3000:]
    assert f"drop ready: _SUCCESS found in s3://{night['drop']}/nights/{DAY}" in logs
    assert [r[1] for r in result_rows(night["db"])["images"]] == night["names"]
    assert s3_server.secret not in logs
