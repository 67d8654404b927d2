"""The Detections page's pictures of images that live in a bucket (SeaweedFS, tests/s3.py),
through the real plugin app: the object the row records is read through the Airflow connection
named in the recorded URL; no key comes from a request; the secret never reaches a response.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import sqlalchemy as sa

from image_etl import store, synth
from image_etl.staging import StagingWriter, image_record
from image_etl.thumbnails import THUMB_MAX_SIDE

from .test_ui_plugin import DAG_ID, NAMES, SHA, _decoded, auth, bearer  # noqa: F401  (auth: fixture)

DAY = dt.date(2026, 10, 3)
CONN = "page_store"
RUN_ID = "manual__s3_ui"


@dataclasses.dataclass
class Bucketed:
    url: str
    bucket: str
    local: Path  # the same images, for comparing pixels
    ids: dict[str, int]


@pytest.fixture(scope="module")
def bucketed(s3_server, tmp_path_factory) -> Bucketed:
    root = tmp_path_factory.mktemp("s3ui")
    paths = synth.make_drop(root / "drops", DAY, 1, seed=31, prefix="full")
    bucket = s3_server.new_bucket()
    for path in paths:
        s3_server.client().upload_file(str(path), bucket, f"nights/{DAY}/{path.name}")
    staging = root / "shard-000.staged.jsonl"
    writer = StagingWriter(staging, "fp", {"model_sha256": SHA, "model_path": "/models/demo.pt",
                                           "names": {str(k): v for k, v in NAMES.items()}})
    writer.resume()
    for path in paths:
        writer.append(image_record(path.name, status="ok", bytes_=path.stat().st_size,
                                   width=2048, height=12000, error=None, dets=None))
    writer.close()
    url = f"sqlite:///{root / 'results.sqlite'}"
    engine = store.engine_from_url(url)
    store.migrate(engine)
    drop = f"s3://{CONN}@{bucket}/nights/{DAY}"
    run = store.RunInfo(run_key=f"{DAG_ID}/{RUN_ID}", dag_id=DAG_ID, run_id=RUN_ID, drop_date=DAY,
                        settings={"drop_dir": drop, "output_dir": f"s3://{CONN}@{bucket}/out"},
                        infer_seconds=1.0)
    store.load_staged(engine, [staging], run, names=NAMES)
    now = dt.datetime.now(dt.UTC)
    with store.write_transaction(engine) as conn:
        for k, rel in enumerate(("../elsewhere/full_00000.jpg", "missing.jpg")):
            conn.execute(store.images.insert().values(
                model_sha256=SHA, drop_date=DAY + dt.timedelta(days=k + 1), rel_path=rel,
                run_key="x/crafted", bytes=1, width=64, height=64, status="ok", error=None,
                processed_at=now, drop_dir=drop, output_dir=None))
    with engine.connect() as conn:
        ids = dict(conn.execute(sa.text("SELECT rel_path, id FROM images")).all())
    engine.dispose()
    return Bucketed(url, bucket, root / "drops" / DAY.isoformat(), ids)


@pytest.fixture(scope="module")
def page(bucketed, auth, s3_server, tmp_path_factory):  # noqa: F811
    from fastapi.testclient import TestClient

    from image_etl_detections import results_db
    from image_etl_detections.app import create_app

    saved = {k: os.environ.get(k) for k in ("IMAGE_ETL_DB_URL", f"AIRFLOW_CONN_{CONN.upper()}",
                                            "IMAGE_ETL_THUMBNAIL_CACHE_DIR")}
    os.environ["IMAGE_ETL_DB_URL"] = bucketed.url
    os.environ[f"AIRFLOW_CONN_{CONN.upper()}"] = json.dumps(
        {"conn_type": "aws", "login": s3_server.key, "password": s3_server.secret,
         "extra": {"endpoint_url": s3_server.endpoint_url, "region_name": s3_server.region}})
    os.environ["IMAGE_ETL_THUMBNAIL_CACHE_DIR"] = str(tmp_path_factory.mktemp("thumbs"))
    results_db.forget()
    try:
        with TestClient(create_app()) as c:
            yield c
    finally:
        results_db.forget()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _no_secret(s3_server, *responses) -> None:
    for r in responses:
        body = r.content + str(dict(r.headers)).encode()
        assert s3_server.secret.encode() not in body and s3_server.key.encode() not in body


def test_thumbnail_and_region_are_read_from_the_recorded_object(page, bucketed, s3_server):
    image_id = bucketed.ids["full_00000.jpg"]
    full = cv2.imdecode(np.fromfile(bucketed.local / "full_00000.jpg", np.uint8),
                        cv2.IMREAD_COLOR)
    first = page.get(f"/api/images/{image_id}/thumbnail", headers=bearer("viewer"))
    thumb = _decoded(first)
    assert thumb.shape[:2] == (THUMB_MAX_SIDE, 256)
    shrunk = cv2.resize(full, (256, THUMB_MAX_SIDE), interpolation=cv2.INTER_AREA)
    assert np.abs(shrunk.astype(int) - thumb.astype(int)).mean() < 4
    second = page.get(f"/api/images/{image_id}/thumbnail", headers=bearer("viewer"))
    assert (first.headers["x-thumbnail-cache"], second.headers["x-thumbnail-cache"]) == \
        ("miss", "hit")
    cache = Path(os.environ["IMAGE_ETL_THUMBNAIL_CACHE_DIR"]) / "_thumbnails"
    assert len(list(cache.glob(f"{image_id}-*.jpg"))) == 1  # the api-server's disk, not the bucket
    region = page.get(f"/api/images/{image_id}/region",
                      params={"x": 100, "y": 5000, "w": 600, "h": 400}, headers=bearer("viewer"))
    crop = _decoded(region)
    assert np.abs(crop.astype(int) - full[5000:5400, 100:700].astype(int)).mean() < 3
    assert not [k for k in _keys(s3_server, bucketed.bucket) if "thumbnail" in k]
    _no_secret(s3_server, first, second, region)


def test_crafted_and_missing_objects_are_404_without_secrets(page, bucketed, s3_server):
    for rel, reason in (("../elsewhere/full_00000.jpg", "not inside its drop folder"),
                        ("missing.jpg", "no such object")):
        for suffix, params in (("thumbnail", {}), ("region", {"x": 0, "y": 0, "w": 8, "h": 8})):
            r = page.get(f"/api/images/{bucketed.ids[rel]}/{suffix}", params=params,
                         headers=bearer("viewer"))
            assert r.status_code == 404 and reason in r.text, (rel, suffix, r.text)
            _no_secret(s3_server, r)


def test_a_refused_connection_is_502_naming_the_bucket(page, bucketed, s3_server, monkeypatch):
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN.upper()}", json.dumps(
        {"conn_type": "aws", "login": s3_server.key, "password": "not-the-secret-123",
         "extra": {"endpoint_url": s3_server.endpoint_url}}))
    r = page.get(f"/api/images/{bucketed.ids['full_00000.jpg']}/region",
                 params={"x": 0, "y": 0, "w": 8, "h": 8}, headers=bearer("viewer"))
    assert r.status_code == 502 and f"s3://{bucketed.bucket}/" in r.text and "access denied" in r.text
    assert "not-the-secret-123" not in r.text
    _no_secret(s3_server, r)


def _keys(s3_server, bucket: str) -> list[str]:
    page = s3_server.client().list_objects_v2(Bucket=bucket)
    return [o["Key"] for o in page.get("Contents", [])]
