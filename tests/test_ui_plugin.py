"""The Detections plugin's FastAPI app: who may call it, what it answers, which files it reads.

The app is the one the plugin registers (``image_etl_detections.app.create_app``), driven by
FastAPI's TestClient; users are real JWTs from Airflow's SimpleAuthManager (initialised as
the api-server does, ``simple_auth_manager_all_admins`` off), checked against a migrated
metadata DB. The results DB is a SQLite file loaded by the real loader from staging files;
the images are synthetic JPEGs on disk, one of them full size (2048 x 12000). One test starts
Airflow's own ``create_app`` in a fresh process to see the plugin mounted and listed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import sqlalchemy as sa

from image_etl import store, synth
from image_etl.staging import StagingWriter, image_record
from image_etl.thumbnails import CACHE_DIR, REGION_MAX_SIDE, THUMB_MAX_SIDE

from .conftest import ROOT

PLUGINS = ROOT / "plugins"
if str(PLUGINS) not in sys.path:
    sys.path.insert(0, str(PLUGINS))  # as Airflow does with its plugins_folder

DAG_ID = "nightly_detections"
DAY = dt.date(2026, 11, 20)
CRAFTED_DAY = dt.date(2026, 11, 21)
SHA = "e5" * 32
NAMES = {0: "spot", 1: "patch"}
RUN_ID = "manual__ui_test"


# --- the world: drop, results DB, users ------------------------------------------------------------

@dataclasses.dataclass
class World:
    root: Path
    drop: Path
    out: Path
    secret: Path
    url: str
    engine: sa.Engine
    ids: dict[str, int]  # rel_path → image id
    crafted: dict[str, int]  # what the crafted row tries → image id


def _truth_dets(drops: Path, path: Path, width: int, height: int, rng: np.random.Generator):
    boxes = synth.read_labels(synth.truth_path(drops, DAY, path.name), width, height)
    rows = [[b.cls, float(rng.uniform(0.3, 0.99)), b.x1, b.y1, b.x2, b.y2, (b.x1 + b.x2) / 2 / width,
             (b.y1 + b.y2) / 2 / height, (b.x2 - b.x1) / width, (b.y2 - b.y1) / height] for b in boxes]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 10)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("ui")
    drops = root / "drops"
    small = synth.make_drop(drops, DAY, 3, width=512, height=3000, seed=11)
    [full] = synth.make_drop(drops, DAY, 1, seed=12, prefix="full")
    drop = drops / DAY.isoformat()
    (drop / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    out = root / "out" / DAY.isoformat()
    out.mkdir(parents=True)
    # A real picture outside the drop: what every crafted row below tries to reach.
    secret_dir = root / "secret"
    secret_dir.mkdir()
    secret = secret_dir / "secret.jpg"
    cv2.imwrite(str(secret), np.full((64, 64, 3), 200, np.uint8))
    os.symlink(secret, drop / "link.jpg")
    os.symlink(secret_dir, drop / "linkdir")

    rng = np.random.default_rng(3)
    staging = root / "shard-000.staged.jsonl"
    writer = StagingWriter(staging, "fp", {"model_sha256": SHA, "model_path": "/models/demo.pt",
                                           "names": {str(k): v for k, v in NAMES.items()}})
    writer.resume()
    for path in [*small, full]:
        h, w = (3000, 512) if path in small else (12000, 2048)
        writer.append(image_record(path.name, status="ok", bytes_=path.stat().st_size, width=w,
                                   height=h, error=None, dets=_truth_dets(drops, path, w, h, rng)))
    writer.append(image_record("broken.jpg", status="failed", bytes_=28, width=0, height=0,
                               error="cannot decode JPEG data (corrupt or truncated)", dets=None))
    writer.close()
    url = f"sqlite:///{root / 'results.sqlite'}"
    engine = store.engine_from_url(url)
    store.migrate(engine)
    run = store.RunInfo(run_key=f"{DAG_ID}/{RUN_ID}", dag_id=DAG_ID, run_id=RUN_ID, drop_date=DAY,
                        settings={"drop_dir": str(drop), "output_dir": str(out)}, infer_seconds=2.0)
    store.load_staged(engine, [staging], run, names=NAMES)
    with engine.connect() as conn:
        ids = dict(conn.execute(sa.text("SELECT rel_path, id FROM images")).all())
    crafted = _crafted_rows(engine, drop, secret)
    return World(root, drop, out, secret, url, engine, ids, crafted)


def _crafted_rows(engine: sa.Engine, drop: Path, secret: Path) -> dict[str, int]:
    """Rows nobody's load would write, each pointing at the secret some way (each its own night)."""
    tries = {
        "dotdot": (str(drop), "../../secret/secret.jpg"),
        "absolute": (str(drop), str(secret)),
        "file symlink": (str(drop), "link.jpg"),
        "folder symlink": (str(drop), "linkdir/secret.jpg"),
        "dot segment": (str(drop), "./../../secret/secret.jpg"),
        "empty segment": (str(drop), "//" + str(secret).lstrip("/")),
        "drop_dir with ..": (str(drop / ".." / ".." / "secret"), "secret.jpg"),
        "relative drop_dir": (os.path.relpath(secret.parent), "secret.jpg"),
        "no drop_dir": (None, "secret.jpg"),
        "missing file": (str(drop), "nothing-here.jpg"),
        "not an image": (str(drop), "broken.jpg"),
    }
    ids = {}
    now = dt.datetime.now(dt.UTC)
    with store.write_transaction(engine) as conn:
        for k, (what, (drop_dir, rel_path)) in enumerate(tries.items()):
            ids[what] = conn.execute(store.images.insert().values(
                model_sha256=SHA, drop_date=CRAFTED_DAY + dt.timedelta(days=k), rel_path=rel_path,
                run_key="x/crafted",
                bytes=1, width=64, height=64, status="ok", error=None, processed_at=now,
                drop_dir=drop_dir, output_dir=None).returning(store.images.c.id)).scalar_one()
            assert k == len(ids) - 1
    return ids


@pytest.fixture(scope="module")
def auth(airflow_home):
    """Airflow's auth manager, set up as the api-server sets it up."""
    from airflow.api_fastapi.app import init_auth_manager, purge_cached_app

    purge_cached_app()
    return init_auth_manager()


def token(role: str | None, username: str | None = None) -> str:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    user = SimpleAuthManagerUser(username=username or f"user-{role}", role=role)
    return get_auth_manager().generate_jwt(user)


def bearer(role: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(role)}"}


@pytest.fixture(scope="module")
def client(world, auth):
    from fastapi.testclient import TestClient

    from image_etl_detections import results_db
    from image_etl_detections.app import create_app

    previous = os.environ.get("IMAGE_ETL_DB_URL")
    os.environ["IMAGE_ETL_DB_URL"] = world.url
    results_db.forget()
    with TestClient(create_app()) as c:
        yield c
    results_db.forget()
    if previous is None:
        os.environ.pop("IMAGE_ETL_DB_URL", None)
    else:
        os.environ["IMAGE_ETL_DB_URL"] = previous


def every_route(world: World) -> dict[str, dict]:
    """Each route of the app with parameters that make it answer 200 for a reader."""
    image = world.ids["full_00000.jpg"]
    day = DAY.isoformat()
    return {
        "/": {}, "/static/app.js": {}, "/static/app.css": {},
        "/api/models": {}, "/api/nights": {"model": SHA}, "/api/night": {"model": SHA, "date": day},
        "/api/images": {"model": SHA, "date": day}, "/api/failures": {"model": SHA, "date": day},
        f"/api/images/{image}": {}, f"/api/images/{image}/thumbnail": {},
        f"/api/images/{image}/region": {"x": 0, "y": 0, "w": 64, "h": 64},
        "/api/run": {"run_id": RUN_ID},
    }


def _route_templates(app) -> set[str]:
    return {r.path for r in app.routes}


# --- who may call ---------------------------------------------------------------------------------

def test_the_app_has_no_route_outside_the_list_and_no_mount(client):
    from fastapi.routing import APIRoute

    app = client.app
    assert all(isinstance(r, APIRoute) for r in app.routes), "a Mount (StaticFiles) or plain route"
    assert _route_templates(app) == {
        "/", "/static/{name}", "/api/models", "/api/nights", "/api/night", "/api/images",
        "/api/failures", "/api/images/{image_id}", "/api/images/{image_id}/thumbnail",
        "/api/images/{image_id}/region", "/api/run"}


def test_anonymous_gets_401_everywhere(client, world):
    for path, params in every_route(world).items():
        r = client.get(path, params=params)
        assert r.status_code == 401, (path, r.status_code, r.text[:200])
        assert r.headers["content-type"].startswith("application/json"), path
    # Docs and schema are off: they would be routes without the dependency.
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404


def test_a_bad_or_foreign_token_is_refused(client):
    from airflow.api_fastapi.auth.tokens import JWTGenerator

    forged = JWTGenerator(secret_key="not-the-server-secret", valid_for=600,
                          audience="apache-airflow").generate({"sub": "mallory", "role": "admin"})
    for headers in ({"Authorization": f"Bearer {forged}"}, {"Authorization": "Bearer not-a-jwt"}):
        r = client.get("/api/models", headers=headers)
        assert r.status_code in (401, 403), r.text


def test_a_user_without_dag_access_gets_403_everywhere(client, world):
    nobody = bearer(None)  # a user the auth manager grants nothing
    for path, params in every_route(world).items():
        r = client.get(path, params=params, headers=nobody)
        assert r.status_code == 403, (path, r.status_code, r.text[:200])
        assert "nightly_detections" in r.json()["detail"]


def _no_nightly_manager():
    """An auth manager (SimpleAuthManager's roles) that grants DAGs in general, and every DAG
    but nightly_detections: the page must ask about that DAG, not about DAGs in general."""
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    class NoNightlyManager(SimpleAuthManager):
        def is_authorized_dag(self, *, method, user, access_entity=None, details=None):
            if details is not None and details.id == DAG_ID:
                return False
            return super().is_authorized_dag(method=method, user=user,
                                             access_entity=access_entity, details=details)

    return NoNightlyManager


NoNightlyManager = _no_nightly_manager()


def test_access_is_asked_for_the_nightly_detections_dag(client, world, monkeypatch):
    from airflow.api_fastapi.app import init_auth_manager, purge_cached_app

    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER", f"{__name__}.NoNightlyManager")
    purge_cached_app()
    try:
        manager = init_auth_manager()
        assert type(manager) is NoNightlyManager
        from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails
        from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

        viewer = SimpleAuthManagerUser(username="v", role="viewer")
        assert manager.is_authorized_dag(method="GET", user=viewer, details=DagDetails(id="other_dag"))
        assert manager.is_authorized_dag(method="GET", user=viewer)  # DAGs in general: yes
        for path, params in every_route(world).items():
            r = client.get(path, params=params, headers=bearer("viewer"))
            assert r.status_code == 403, (path, r.status_code)
    finally:
        monkeypatch.delenv("AIRFLOW__CORE__AUTH_MANAGER")
        purge_cached_app()
        init_auth_manager()


def test_a_viewer_gets_200_everywhere_by_bearer_or_cookie(client, world):
    for path, params in every_route(world).items():
        r = client.get(path, params=params, headers=bearer("viewer"))
        assert r.status_code == 200, (path, r.status_code, r.text[:300])
    # The UI's iframe sends the _token cookie, not a header.
    client.cookies.set("_token", token("viewer"))
    try:
        assert client.get("/api/models").status_code == 200
    finally:
        client.cookies.clear()


# --- what it answers --------------------------------------------------------------------------

def _sql(world: World, text: str, **params) -> list[tuple]:
    with world.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(text), params)]


def test_the_nights_are_the_db_counts(client, world):
    models = client.get("/api/models", headers=bearer("viewer")).json()
    assert [m["sha256"] for m in models["models"]] == [SHA] and models["dag_id"] == DAG_ID
    got = client.get("/api/nights", params={"model": SHA}, headers=bearer("viewer")).json()
    night = next(n for n in got["nights"] if n["date"] == DAY.isoformat())
    [(images, ok, failed)] = _sql(world, "SELECT count(*), sum(status = 'ok'), sum(status = 'failed') "
                                         "FROM images WHERE drop_date = :d", d=DAY)
    per_class = dict(_sql(world, "SELECT d.class_name, count(*) FROM detections d JOIN images i "
                                 "ON i.id = d.image_id WHERE i.drop_date = :d GROUP BY d.class_name", d=DAY))
    assert (night["images"], night["ok"], night["failed"]) == (images, ok, failed) == (5, 4, 1)
    assert night["per_class"] == per_class and night["detections"] == sum(per_class.values()) > 0
    assert got["classes"] == ["spot", "patch"]


def test_a_nights_images_failures_and_one_image(client, world):
    listed = client.get("/api/images", params={"model": SHA, "date": DAY.isoformat()},
                        headers=bearer("viewer")).json()
    counts = dict(_sql(world, "SELECT i.rel_path, count(d.image_id) FROM images i LEFT JOIN detections d "
                              "ON d.image_id = i.id WHERE i.drop_date = :d GROUP BY i.id, i.rel_path", d=DAY))
    assert {im["rel_path"]: im["detections"] for im in listed["images"]} == counts
    assert [im["detections"] for im in listed["images"]] == sorted(counts.values(), reverse=True)

    spot = client.get("/api/images", params={"model": SHA, "date": DAY.isoformat(), "class_name": "spot",
                                             "min_conf": 0.5}, headers=bearer("viewer")).json()
    want = dict(_sql(world, "SELECT i.rel_path, count(*) FROM images i JOIN detections d "
                            "ON d.image_id = i.id WHERE i.drop_date = :d AND d.class_name = 'spot' "
                            "AND d.confidence >= 0.5 "
                            "GROUP BY i.id, i.rel_path", d=DAY))
    assert {im["rel_path"]: im["detections"] for im in spot["images"]} == want

    failures = client.get("/api/failures", params={"model": SHA, "date": DAY.isoformat()},
                          headers=bearer("viewer")).json()
    assert [(f["rel_path"], f["error"]) for f in failures["failures"]] == [
        ("broken.jpg", "cannot decode JPEG data (corrupt or truncated)")]

    image_id = world.ids["full_00000.jpg"]
    detail = client.get(f"/api/images/{image_id}", headers=bearer("viewer")).json()
    rows = _sql(world, "SELECT det_index, class_name, confidence, x1, y1, x2, y2 FROM detections "
                       "WHERE image_id = :i ORDER BY det_index", i=image_id)
    assert [(d["det_index"], d["class_name"], d["confidence"], d["x1"], d["y1"], d["x2"], d["y2"])
            for d in detail["detections"]] == rows and rows
    assert (detail["width"], detail["height"], detail["run_id"]) == (2048, 12000, RUN_ID)

    run = client.get("/api/run", params={"run_id": RUN_ID}, headers=bearer("viewer")).json()
    assert [(n["date"], n["images"], n["failed"]) for n in run["nights"]] == [(DAY.isoformat(), 5, 1)]
    assert client.get("/api/run", params={"run_id": "nope"}, headers=bearer("viewer")).status_code == 404


def _decoded(response) -> np.ndarray:
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"] == "image/jpeg"
    image = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def test_thumbnail_is_capped_scaled_and_cached_under_the_output_folder(client, world):
    image_id = world.ids["full_00000.jpg"]
    source = world.drop / "full_00000.jpg"
    for earlier in (world.out / CACHE_DIR).glob(f"{image_id}-*.jpg"):  # other tests' requests
        earlier.unlink()
    first = client.get(f"/api/images/{image_id}/thumbnail", headers=bearer("viewer"))
    thumb = _decoded(first)
    assert thumb.shape[:2] == (THUMB_MAX_SIDE, 256)  # 2048 x 12000 at 1/8
    assert len(first.content) < source.stat().st_size / 20
    cached = sorted((world.out / CACHE_DIR).glob(f"{image_id}-*.jpg"))
    assert len(cached) == 1 and cached[0].read_bytes() == first.content
    second = client.get(f"/api/images/{image_id}/thumbnail", headers=bearer("viewer"))
    assert (first.headers["x-thumbnail-cache"], second.headers["x-thumbnail-cache"]) == ("miss", "hit")
    assert second.content == first.content
    # The pixels are the image's: compare with a plain full decode, shrunk.
    full = cv2.imdecode(np.fromfile(source, np.uint8), cv2.IMREAD_COLOR)
    shrunk = cv2.resize(full, (256, THUMB_MAX_SIDE), interpolation=cv2.INTER_AREA)
    assert np.abs(shrunk.astype(int) - thumb.astype(int)).mean() < 4
    # A changed source is a new cache entry.
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert client.get(f"/api/images/{image_id}/thumbnail",
                      headers=bearer("viewer")).headers["x-thumbnail-cache"] == "miss"
    assert len(list((world.out / CACHE_DIR).glob(f"{image_id}-*.jpg"))) == 2
    small = _decoded(client.get(f"/api/images/{world.ids['scan_00000.jpg']}/thumbnail",
                                headers=bearer("viewer")))
    assert small.shape[:2] == (1500, 256)  # 512 x 3000 at 1/2


def test_a_cache_folder_that_is_a_link_is_not_written_through(client, world, tmp_path):
    image_id = world.ids["scan_00001.jpg"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cache = world.out / CACHE_DIR
    moved = world.out / "cache-moved"
    cache.rename(moved)
    try:
        os.symlink(elsewhere, cache)
        r = client.get(f"/api/images/{image_id}/thumbnail", headers=bearer("viewer"))
        _decoded(r)
        assert r.headers["x-thumbnail-cache"] == "miss" and list(elsewhere.iterdir()) == []
    finally:
        cache.unlink()
        moved.rename(cache)


def test_region_is_native_resolution_and_capped(client, world):
    image_id = world.ids["full_00000.jpg"]
    full = cv2.imdecode(np.fromfile(world.drop / "full_00000.jpg", np.uint8), cv2.IMREAD_COLOR)
    r = client.get(f"/api/images/{image_id}/region", params={"x": 100, "y": 5000, "w": 600, "h": 400},
                   headers=bearer("viewer"))
    crop = _decoded(r)
    assert crop.shape[:2] == (400, 600) and r.headers["x-region"] == "100,5000,600,400"
    assert np.abs(crop.astype(int) - full[5000:5400, 100:700].astype(int)).mean() < 3
    big = client.get(f"/api/images/{image_id}/region", params={"x": 0, "y": 0, "w": 5000, "h": 5000},
                     headers=bearer("viewer"))
    assert _decoded(big).shape[:2] == (REGION_MAX_SIDE, REGION_MAX_SIDE)
    edge = client.get(f"/api/images/{image_id}/region", params={"x": 2000, "y": 11900, "w": 500, "h": 500},
                      headers=bearer("viewer"))
    assert _decoded(edge).shape[:2] == (100, 48) and edge.headers["x-region"] == "2000,11900,48,100"
    for bad in ({"x": 3000, "y": 0, "w": 10, "h": 10}, {"x": -1, "y": 0, "w": 10, "h": 10},
                {"x": 0, "y": 0, "w": 0, "h": 10}, {"x": "a", "y": 0, "w": 1, "h": 1}, {"x": 0}):
        r = client.get(f"/api/images/{image_id}/region", params=bad, headers=bearer("viewer"))
        assert r.status_code == 400, (bad, r.status_code, r.text)


# --- which files it reads ---------------------------------------------------------------------------

def test_crafted_ids_are_400_or_404(client, world):
    for path in ("/api/images/abc", "/api/images/0/thumbnail", "/api/images/-1/region",
                 "/api/images/1.5", "/api/images/99999999999999999999999"):
        r = client.get(path, headers=bearer("viewer"))
        assert r.status_code == 400, (path, r.status_code)
    for path in ("/api/images/987654321", "/api/images/987654321/thumbnail",
                 "/api/images/..%2F..%2Fetc%2Fpasswd/thumbnail", "/static/..%2Fapp.py",
                 "/static/index.html", "/static/../app.py"):
        r = client.get(path, headers=bearer("viewer"))
        assert r.status_code in (400, 404), (path, r.status_code)
    for bad in ({"model": "x" * 64}, {"model": SHA, "date": "2026-13-01"}, {"run_id": ""}):
        assert client.get("/api/images", params=bad, headers=bearer("viewer")).status_code == 400


def test_crafted_rows_never_serve_a_file_outside_the_drop(client, world):
    secret = world.secret.read_bytes()
    assert len(world.crafted) == 11
    for what, image_id in world.crafted.items():
        for suffix, params in (("thumbnail", {}), ("region", {"x": 0, "y": 0, "w": 32, "h": 32})):
            r = client.get(f"/api/images/{image_id}/{suffix}", params=params, headers=bearer("viewer"))
            assert r.status_code == 404, (what, suffix, r.status_code)
            assert r.headers["content-type"].startswith("application/json"), (what, suffix)
            assert secret not in r.content and str(world.secret) not in r.text, (what, suffix)
    # A path in the query string is ignored: the recorded file is served, nothing else.
    image_id = world.ids["scan_00002.jpg"]
    plain = client.get(f"/api/images/{image_id}/thumbnail", headers=bearer("viewer"))
    sneaky = client.get(f"/api/images/{image_id}/thumbnail",
                        params={"path": str(world.secret), "drop_dir": str(world.secret.parent),
                                "rel_path": "secret.jpg"}, headers=bearer("viewer"))
    assert sneaky.status_code == 200 and sneaky.content == plain.content


def test_the_page_loads_only_relative_urls_from_itself(client, world):
    viewer = bearer("viewer")
    page = client.get("/", headers=viewer)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'self'" in csp
    for name, text in (("index.html", page.text),
                       ("app.js", client.get("/static/app.js", headers=viewer).text),
                       ("app.css", client.get("/static/app.css", headers=viewer).text)):
        text = text.replace('"http://www.w3.org/2000/svg"', "")  # SVG's namespace name, not a URL
        assert "http://" not in text and "https://" not in text, name
        for absolute in ('src="/', "href=\"/", 'fetch("/', "fetch('/", "fetch(`/", "url(/", "url('/"):
            assert absolute not in text, (name, absolute)
        assert "<script>" not in text and " style=" not in text, name  # the CSP forbids inline code


def test_no_results_database_is_a_503_without_the_password(client, monkeypatch):
    from image_etl_detections import results_db

    monkeypatch.setenv("IMAGE_ETL_DB_URL", "postgresql+psycopg2://etl:s3cret-pw@127.0.0.1:9/none")
    results_db.forget()
    try:
        r = client.get("/api/models", headers=bearer("viewer"))
        assert r.status_code == 503 and "s3cret-pw" not in r.text and "***" in r.text, r.text
    finally:
        monkeypatch.undo()
        results_db.forget()


# --- mounted by Airflow itself ----------------------------------------------------------------------

MOUNTED = textwrap.dedent("""
    import json, sys
    from airflow import plugins_manager
    from airflow.api_fastapi.app import create_app, get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi.testclient import TestClient

    plugins, errors = plugins_manager._get_plugins()
    app = create_app(apps="core")
    token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="v", role="viewer"))
    out = {"plugins": [p.name for p in plugins], "errors": errors,
           "clobbered": [m for m in ("app", "auth", "pictures", "results_db", "__init__")
                         if m in sys.modules],
           "mounts": [getattr(r, "path", None) for r in app.routes]}
    with TestClient(app) as c:
        out["anonymous"] = c.get("/detections/api/models").status_code
        auth = {"Authorization": "Bearer " + token}
        out["viewer"] = c.get("/detections/api/models", headers=auth).status_code
        out["page"] = c.get("/detections/", cookies={"_token": token}).status_code
        views = c.get("/api/v2/plugins", headers=auth).json()
        out["views"] = [v for p in views["plugins"] if p["name"] == "image_etl_detections"
                        for v in p["external_views"]]
    print("RESULT " + json.dumps(out))
""")


def test_airflow_mounts_the_plugin_and_lists_its_views(world, airflow_home):
    env = {**os.environ, "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS), "IMAGE_ETL_DB_URL": world.url,
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "include"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", MOUNTED], env=env, capture_output=True, text=True,
                          timeout=300, cwd=world.root)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert "image_etl_detections" in out["plugins"] and out["errors"] == {}, out
    assert out["clobbered"] == [], "a package module was imported as a top-level plugin module"
    assert "/detections" in out["mounts"]
    assert (out["anonymous"], out["viewer"], out["page"]) == (401, 200, 200)
    views = {v["destination"]: v for v in out["views"]}
    assert set(views) == {"nav", "dag", "dag_run"}
    for v in views.values():
        assert v["name"] == "Detections" and v["url_route"] and not v["href"].startswith(("/", "http"))
    assert "{RUN_ID}" in views["dag_run"]["href"] and "{DAG_ID}" in views["dag"]["href"]
