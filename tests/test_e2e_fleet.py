"""A GPU fleet with no shared disk, end to end on a real Airflow 3 (issue 23, item 5).

The stack of ``tests/airflow_stack.py`` (API server, scheduler, DAG processor, Celery on the
local Redis) with **two** ``gpu`` workers and one ``default`` worker, each a "host" of its own:
its own ``TMPDIR`` (the scratch of the staged rows), ``HOME``, ``IMAGE_ETL_CACHE_DIR`` (the
OpenVINO copy of the weights: each exports its own) and ``IMAGE_ETL_LOCK_DIR`` (the GPU lease).
No folder of the night is shared: the drop is only in a SeaweedFS bucket (``tests/s3.py``),
reached through an Airflow ``aws`` connection with an ``endpoint_url``, and the outputs (labels,
the run folder with the manifest, shard lists and staged rows) go to another bucket. CPU
devices stand in for the GPUs.

1. A night on two shards, one per ``gpu`` worker, behind the drop-ready gate: the run waits
   in the triggerer (which resolves the drop URL's connection itself) until the marker object
   is in the bucket; then every image is loaded exactly once, its label in the output bucket,
   and nothing of the night is left on any worker's disk.
2. One worker's whole process tree is SIGKILLed in the middle of its shard, after it flushed
   some staged rows to the bucket. The scheduler finds the task's heartbeat gone, the retry runs
   on the *other* worker (which never saw the shard) and resumes from the staged rows in the
   bucket: it infers fewer images than the shard has, and the night is loaded exactly once.

The two tests share one stack when run together; each also runs alone (its night is its own).
On a small shared machine run one at a time (~2 and ~4 minutes here, stack start included):
``timeout 900 .venv/bin/python -m pytest -q tests/test_e2e_fleet.py -k first_night``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from image_etl import synth

from .airflow_stack import (
    DEFAULT_QUEUE,
    GPU_QUEUE,
    AirflowStack,
    Worker,
    sigterm_as_interrupt,
    wait_for,
)
from .conftest import DEMO_MODEL, ROOT
from .dbrows import result_rows
from .pg import PostgresUnavailable, fresh_database
from .s3 import S3Server
from .test_e2e_airflow import EXECUTED, _check, _redis_up, _unavailable

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DAG_ID = "nightly_detections"
ARTIFACTS = ROOT / "test-artifacts" / "e2e-fleet"
CONN_ID = "fleet_s3"
_TODAY = dt.datetime.now(dt.UTC).date()
# Further apart than the late-file look-back (catchup_nights, 2): each test's run is its night
# alone, whichever test runs first or alone.
NIGHT, KILL_NIGHT = _TODAY - dt.timedelta(days=30), _TODAY - dt.timedelta(days=25)
COUNTS = {NIGHT: 6, KILL_NIGHT: 40}
BATCH = 2
RUN_TIMEOUT_S = 420
# How long a killed task stays "running" before the scheduler fails it (default 300 s).
HEARTBEAT_TIMEOUT_S = 30
GPU_WORKERS = ("gpu-a", "gpu-b")


@dataclasses.dataclass
class Fleet:
    stack: AirflowStack
    client: httpx.Client
    s3: S3Server
    drop_bucket: str
    out_bucket: str
    hosts: dict[str, Path]  # worker name -> its private folder (scratch, home, cache, locks)
    results_url: str
    names: dict[dt.date, list[str]]  # the images of each night, as uploaded


def _host_env(root: Path) -> dict[str, str]:
    """One "host": its own scratch, home, model cache and lock folder."""
    folders = {"TMPDIR": root / "tmp", "HOME": root / "home",
               "IMAGE_ETL_CACHE_DIR": root / "cache", "IMAGE_ETL_LOCK_DIR": root / "locks"}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    return {k: str(v) for k, v in folders.items()}


def _upload_drop(s3: S3Server, bucket: str, staging: Path, day: dt.date, count: int,
                 seed: int, width: int, height: int) -> list[str]:
    """A synthetic night put in the bucket under ``drops/<date>/``; the local copy is removed."""
    paths = synth.make_drop(staging, day, count, width=width, height=height, seed=seed)
    client = s3.client()
    for path in paths:
        client.put_object(Bucket=bucket, Key=f"drops/{day.isoformat()}/{path.name}",
                          Body=path.read_bytes())
    shutil.rmtree(staging)
    return sorted(p.name for p in paths)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, s3_server: S3Server):
    if not DEMO_MODEL.is_file():
        pytest.fail(f"demo model missing: {DEMO_MODEL}", pytrace=False)
    if not _redis_up():
        _unavailable("Redis is not answering on 127.0.0.1:6379 (the Celery broker)")
    base = tmp_path_factory.mktemp("fleet")
    drop_bucket, out_bucket = s3_server.new_bucket(), s3_server.new_bucket()
    names = {NIGHT: _upload_drop(s3_server, drop_bucket, base / "upload", NIGHT, COUNTS[NIGHT],
                                 301, 512, 3000),
             KILL_NIGHT: _upload_drop(s3_server, drop_bucket, base / "upload", KILL_NIGHT,
                                      COUNTS[KILL_NIGHT], 302, 1024, 6000)}
    hosts = {name: base / "hosts" / name for name in (*GPU_WORKERS, "cpu")}
    shutil.rmtree(ARTIFACTS, ignore_errors=True)

    try:
        with sigterm_as_interrupt(), fresh_database() as metadata_url, \
                fresh_database() as results_url:
            connection = {"conn_type": "aws", "login": s3_server.key, "password": s3_server.secret,
                          "extra": {"endpoint_url": s3_server.endpoint_url,
                                    "region_name": s3_server.region}}
            env = {
                "AIRFLOW_CONN_IMAGE_ETL_DB": results_url.replace("postgresql+psycopg2://",
                                                                 "postgresql://"),
                f"AIRFLOW_CONN_{CONN_ID.upper()}": json.dumps(connection),
                # The drop names its connection in the URL; the outputs use the default one.
                "IMAGE_ETL_DROP_DIR": f"s3://{CONN_ID}@{drop_bucket}/drops/{{date}}",
                "IMAGE_ETL_OUTPUT_DIR": f"s3://{out_bucket}/out/{{date}}",
                "IMAGE_ETL_STORAGE_CONN_ID": CONN_ID,
                "IMAGE_ETL_ALLOWED_ROOTS": f"s3://{drop_bucket}/drops:s3://{out_bucket}/out",
                "IMAGE_ETL_MODEL": str(DEMO_MODEL),
                "IMAGE_ETL_DEVICES": "cpu,cpu",
                "IMAGE_ETL_SETTLE_SECONDS": "0",
                "IMAGE_ETL_BATCH_SIZE": str(BATCH),
                "IMAGE_ETL_GPUS": "2",
                # Staged rows go to the bucket after every batch (default: every 10 s or 100
                # images), so that a kill lands after some of them.
                "IMAGE_ETL_STAGING_FLUSH_IMAGES": str(BATCH),
                # The drop-ready gate's triggerer looks for the marker every 2 s (default 30).
                "IMAGE_ETL_DROP_POLL_S": "2",
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_S),
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            }
            workers = [Worker(name, GPU_QUEUE, _host_env(hosts[name])) for name in GPU_WORKERS]
            workers.append(Worker("cpu", DEFAULT_QUEUE, _host_env(hosts["cpu"])))
            stack = AirflowStack(home=base / "airflow_home", artifacts=ARTIFACTS,
                                 metadata_url=metadata_url, extra_env=env, workers=workers)
            with stack, stack.client() as client:
                _check(client.patch(f"/dags/{DAG_ID}", json={"is_paused": False}))
                yield Fleet(stack, client, s3_server, drop_bucket, out_bucket, hosts,
                            results_url, names)
            assert stack.strays() == [], "processes of the stack outlived stop()"
    except PostgresUnavailable as e:
        _unavailable(f"PostgreSQL is not available: {e}")


# --- helpers -----------------------------------------------------------------------------------

def _trigger(fleet: Fleet, run_id: str, day: dt.date, **conf: Any) -> None:
    _check(fleet.client.post(f"/dags/{DAG_ID}/dagRuns", json={
        "dag_run_id": run_id, "logical_date": None, "conf": {"date": day.isoformat(), **conf}}))


def _xcom(fleet: Fleet, run_id: str, task_id: str, map_index: int = -1) -> Any:
    entry = _check(fleet.client.get(
        f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
        params={"deserialize": "true", "map_index": map_index}))
    return entry["value"]


def _task_logs(fleet: Fleet, run_id: str, task_id: str) -> dict[str, str]:
    folder = fleet.stack.artifacts / "task-logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / \
        f"task_id={task_id}"
    return {str(p.relative_to(folder)): p.read_text(errors="replace")
            for p in sorted(folder.rglob("*.log"))}


def _failure_report(fleet: Fleet, run_id: str) -> str:
    tis = _check(fleet.client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances"))
    out = [f"{t['task_id']}[{t['map_index']}]={t['state']} try {t['try_number']}"
           for t in tis["task_instances"]]
    for task in ("discover", "partition", "infer", "load", "report"):
        for name, text in _task_logs(fleet, run_id, task).items():
            out.append(f"--- {task}/{name} ---\n" + "\n".join(text.splitlines()[-20:]))
    return "\n".join(out)


def _wait_run(fleet: Fleet, run_id: str, timeout_s: float = RUN_TIMEOUT_S) -> None:
    def finished():
        run = _check(fleet.client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}"))
        return run if run["state"] in ("success", "failed") else None

    run = wait_for(f"run {run_id}", finished, timeout_s, poll_s=2,
                   on_timeout=lambda: _failure_report(fleet, run_id))
    assert run["state"] == "success", f"run {run_id} failed:\n{_failure_report(fleet, run_id)}"


def _ran_infer(fleet: Fleet, run_id: str) -> dict[str, list[tuple[int, int]]]:
    """worker -> the (map index, attempt) of this run's infer tasks it executed."""
    ran: dict[str, list[tuple[int, int]]] = {}
    for name in GPU_WORKERS:
        for m in EXECUTED.finditer(fleet.stack.log_text(f"worker-{name}")):
            if m["run"] == run_id and m["task"] == "infer":
                ran.setdefault(name, []).append((int(m["map_index"]), int(m["attempt"])))
    return ran


def _keys(fleet: Fleet, bucket: str, prefix: str) -> list[str]:
    pages = fleet.s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                        Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _staged_keys(fleet: Fleet, day: dt.date) -> list[str]:
    """The shards' staged-rows objects of ``day``'s runs in the output bucket."""
    return [k for k in _keys(fleet, fleet.out_bucket, f"out/{day.isoformat()}/_runs/")
            if k.endswith(".staged.jsonl")]


def _staged_records(fleet: Fleet, key: str) -> list[dict]:
    """The image records (not the header) of a staged-rows object, as the bucket has it now."""
    body = fleet.s3.client().get_object(Bucket=fleet.out_bucket, Key=key)["Body"].read()
    records = []
    for line in body.decode().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line: never in a PUT object, but harmless here
        if isinstance(record, dict) and "rel_path" in record:
            records.append(record)
    return records


def _night_rows(fleet: Fleet, day: dt.date) -> list[tuple[str, str]]:
    rows = result_rows(fleet.results_url)["images"]
    return sorted((r[1], r[3]) for r in rows if r[0] == day.isoformat())


def _files_of_the_night(roots: list[Path], names: list[str], day: dt.date) -> list[str]:
    """Every file under ``roots`` that belongs to the night: an image, a label or staged rows
    of one of ``names``, a run folder's file, or anything named after the night's date."""
    stems = [Path(n).stem for n in names]
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file() and not path.is_symlink():
                continue
            text = str(path.relative_to(root))
            if (any(stem in text for stem in stems) or day.isoformat() in text
                    or path.suffix in (".jpg", ".jpeg", ".png", ".txt", ".jsonl")
                    or path.name.startswith(("manifest", "shard-"))
                    or "staging" in path.name):
                found.append(f"{root}: {text}")
    return found


def _assert_night_loaded(fleet: Fleet, day: dt.date) -> None:
    names = fleet.names[day]
    # Every image exactly once, ok; a label for each in the output bucket.
    assert _night_rows(fleet, day) == [(n, "ok") for n in names]
    labels = _keys(fleet, fleet.out_bucket, f"out/{day.isoformat()}/labels/")
    assert labels == sorted(f"out/{day.isoformat()}/labels/{Path(n).stem}.txt" for n in names)


# --- the tests ------------------------------------------------------------------------------------

def test_first_night_from_a_bucket_on_two_workers_that_share_no_folder(fleet: Fleet):
    run_id = "fleet_first_night"
    _trigger(fleet, run_id, NIGHT, drop_ready_marker="_SUCCESS", drop_wait_timeout=600)
    gate = f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/wait_for_drop"
    wait_for("wait_for_drop to be deferred", lambda: _check(fleet.client.get(gate))["state"]
             == "deferred", RUN_TIMEOUT_S, poll_s=1, on_timeout=lambda: _failure_report(
                 fleet, run_id))
    time.sleep(5)  # a few looks by the triggerer in the bucket, the marker still absent
    assert _check(fleet.client.get(gate))["state"] == "deferred", _failure_report(fleet, run_id)
    fleet.s3.client().put_object(Bucket=fleet.drop_bucket, Key=f"drops/{NIGHT}/_SUCCESS",
                                 Body=b"")
    _wait_run(fleet, run_id)
    gate_log = "\n".join(_task_logs(fleet, run_id, "wait_for_drop").values())
    folder = f"s3://{fleet.drop_bucket}/drops/{NIGHT}"
    assert f"waiting up to 600s for _SUCCESS in {folder}" in gate_log, gate_log[-2000:]
    assert f"drop ready: _SUCCESS found in {folder}" in gate_log, gate_log[-2000:]

    _assert_night_loaded(fleet, NIGHT)
    rows = result_rows(fleet.results_url)
    assert any(d[0] == NIGHT.isoformat() for d in rows["detections"]), "nothing detected"
    # Two shards, one on each gpu worker ("host"); the staged rows of both in the bucket.
    ran = _ran_infer(fleet, run_id)
    assert sorted(ran) == list(GPU_WORKERS), ran
    assert sorted(i for found in ran.values() for i, _ in found) == [0, 1], ran
    assert len(_staged_keys(fleet, NIGHT)) == 2
    # Each worker exported its own OpenVINO copy into its own cache: no shared model cache.
    for name in GPU_WORKERS:
        assert list((fleet.hosts[name] / "cache").rglob("*.xml")), f"{name}: no model cache"
    # The load read the staged rows from the bucket: the load task's host has none of them.
    assert _xcom(fleet, run_id, "load")["images"] == COUNTS[NIGHT]
    # Nothing of the night on any worker's disk (scratch, home, cache, locks), nor in the
    # Airflow home the components share here.
    roots = [*fleet.hosts.values(), fleet.stack.home]
    assert _files_of_the_night(roots, fleet.names[NIGHT], NIGHT) == []


def test_killed_worker_mid_shard_retry_resumes_from_the_bucket(fleet: Fleet):
    run_id = "fleet_killed_worker"
    images = COUNTS[KILL_NIGHT]
    _trigger(fleet, run_id, KILL_NIGHT, devices="cpu")  # one shard of all the night's images

    # Which worker took the shard, then: kill it once some staged rows are in the bucket.
    def taken() -> str | None:
        ran = _ran_infer(fleet, run_id)
        if not ran and _check(fleet.client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}"))["state"] \
                == "failed":
            pytest.fail(f"run {run_id} failed before infer:\n{_failure_report(fleet, run_id)}")
        return next(iter(ran), None)

    victim = wait_for("a gpu worker to take the shard", taken, RUN_TIMEOUT_S, poll_s=0.5,
                      on_timeout=lambda: _failure_report(fleet, run_id))
    survivor = next(n for n in GPU_WORKERS if n != victim)

    def some_rows_staged() -> int | None:
        keys = _staged_keys(fleet, KILL_NIGHT)
        done = len(_staged_records(fleet, keys[0])) if keys else 0
        if done >= images:
            pytest.fail(f"the shard finished ({done} images) before the kill point: give the "
                        "test a longer shard")
        return done if done >= 2 * BATCH else None

    wait_for("staged rows of the shard in the bucket", some_rows_staged, RUN_TIMEOUT_S,
             poll_s=0.05, on_timeout=lambda: _failure_report(fleet, run_id))
    killed = fleet.stack.kill_tree(f"worker-{victim}")
    assert len(killed) >= 3, killed  # the worker, its pool process, the task's supervisor+runner
    # What the dead attempt left in the bucket is what any retry can resume from.
    [key] = _staged_keys(fleet, KILL_NIGHT)
    left = _staged_records(fleet, key)
    done = {r["rel_path"] for r in left if r.get("status") == "ok"}
    assert 0 < len(done) < images, len(done)

    _wait_run(fleet, run_id)

    # The retry ran on the other worker, which never saw the shard before.
    ran = _ran_infer(fleet, run_id)
    assert ran.get(victim) == [(0, 1)] and ran.get(survivor) == [(0, 2)], ran
    result = _xcom(fleet, run_id, "infer", map_index=0)
    assert (result["images"], result["resumed"], result["processed"]) == \
        (images, len(done), images - len(done)), result
    logs = _task_logs(fleet, run_id, "infer")
    retry_log = next(text for name, text in logs.items() if "attempt=2" in name)
    assert f"resuming: {len(done)} of {images} images already done by an earlier attempt" \
        in retry_log
    # Re-inferred: the batch groups with unfinished work, whole (worker.pick) - fewer than
    # the shard had, because the first attempt's finished groups were not run again.
    from image_etl.worker import ImageTask, pick

    tasks = [ImageTask(Path(n), n) for n in fleet.names[KILL_NIGHT]]
    reinferred = len(pick(tasks, BATCH, done))
    assert reinferred < images and reinferred <= images - len(done) + BATCH, (reinferred, done)
    _assert_night_loaded(fleet, KILL_NIGHT)
    # The survivor kept nothing of the night on its disk.
    assert _files_of_the_night([fleet.hosts[survivor]], fleet.names[KILL_NIGHT], KILL_NIGHT) == []
