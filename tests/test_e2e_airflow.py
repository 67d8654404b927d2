"""End to end on a real Airflow 3: API server, scheduler, DAG processor, two Celery workers.

One stack for the module (``tests/airflow_stack.py``): metadata in a fresh PostgreSQL database,
CeleryExecutor on the local Redis, a ``gpu`` worker and a ``default`` worker (CPU devices here),
results in another fresh PostgreSQL database through ``AIRFLOW_CONN_IMAGE_ETL_DB``. Everything
goes through the REST API with a JWT from ``POST /auth/token``.

The story, in order (the tests share the stack and build on each other):

1. A manual run with conf: drop date D2 (its logical date is D3), ``devices=cpu,cpu``, its own
   output folder. D2's images land in the results DB; two mapped ``infer`` tasks ran on the
   ``gpu`` queue and pool, labelled by ``map_index_template``.
2. A backfill over D1..D3, reprocess behaviour "completed", no conf (the param defaults come
   from the stack's ``IMAGE_ETL_*`` environment). D1 is new; D2's images are loaded already, so
   its run loads nothing and its rows stay as they were; D3 already has a completed Airflow run
   (step 1's), which the backfill clears and re-runs with the backfill's conf, so D3 is
   processed now. Afterwards every date has exactly its images, once.
3. Every other way to start a run: over REST without a logical date (as the official client
   sends it), with ``airflow dags trigger`` without ``--logical-date``, and a backfill whose
   range is written exactly as the README's example writes it: each covers the dates it names.
   A bad ``devices`` value is refused at trigger time (400, naming it).
4. Headless Chromium screenshots the DAG's grid and its trigger form.
5. The drop-ready gate: a run with ``drop_ready_marker`` sits in ``deferred`` (in the
   triggerer) until the marker is written, then completes. A mapped ``infer`` marked success
   through the REST API before it ran: the load fails naming that shard, nothing is loaded.

The stack is started as a fresh install would be: no ``gpu`` pool. The project's plugin
creates it (``IMAGE_ETL_GPUS`` slots) when the scheduler starts.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import shlex
import shutil
import socket
import struct
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from image_etl import synth
from image_etl.settings import SETTINGS

from .airflow_stack import (
    DEFAULT_QUEUE,
    GPU_QUEUE,
    AirflowStack,
    Chromium,
    sigterm_as_interrupt,
    wait_for,
)
from .conftest import DEMO_MODEL, ROOT
from .dbrows import result_rows as _rows
from .pg import PostgresUnavailable, fresh_database

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DAG_ID = "nightly_detections"
ARTIFACTS = ROOT / "test-artifacts"
MANUAL_RUN = "e2e_manual_conf"
# Past dates relative to the clock: a backfill refuses future dates.
_TODAY = dt.datetime.now(dt.UTC).date()
D1, D2, D3 = (_TODAY - dt.timedelta(days=n) for n in (12, 11, 10))
COUNTS = {D1: 2, D2: 3, D3: 2}
SEEDS = {D1: 101, D2: 102, D3: 103}
# One image each, for the runs of step 3 (kept out of COUNTS: step 2 checks every row it sees).
D4, D5, D6, D7 = (_TODAY - dt.timedelta(days=n) for n in (9, 8, 7, 6))
EXTRA = {D4: 1, D5: 1, D6: 1, D7: 1, _TODAY - dt.timedelta(days=1): 1, _TODAY: 1}
README = ROOT / "README.md"
RUN_TIMEOUT_S = 300
BACKFILL_TIMEOUT_S = 360
LABEL = re.compile(r"^shard (\d+)/(\d+) · cpu · (\d+) images?$")
EXECUTED = re.compile(r"Executing workload in Celery: .*?log_path='dag_id=(?P<dag>[^/]+)"
                      r"/run_id=(?P<run>[^/]+)/task_id=(?P<task>[^/]+)(?:/map_index=(?P<map_index>\d+))?"
                      r"/attempt=(?P<attempt>\d+)\.log'")


def _cron_tick(day: dt.date) -> str:
    """The logical date of the DAG's 02:00 UTC run for ``day``."""
    return f"{day.isoformat()}T02:00:00Z"


def _unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message + " (CI is set: refusing to skip)", pytrace=False)
    pytest.skip(message)


def _redis_up(host: str = "127.0.0.1", port: int = 6379) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclasses.dataclass
class E2E:
    stack: AirflowStack
    client: httpx.Client
    base: Path
    drops: Path
    results_url: str
    done: set[str] = dataclasses.field(default_factory=set)
    snapshot: dict[str, Any] = dataclasses.field(default_factory=dict)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    if not DEMO_MODEL.is_file():
        pytest.fail(f"demo model missing: {DEMO_MODEL} (scripts/train_demo_model.py)", pytrace=False)
    if not _redis_up():
        _unavailable("Redis is not answering on 127.0.0.1:6379 (the Celery broker)")
    base = tmp_path_factory.mktemp("e2e")
    drops = base / "drops"
    for day, count in COUNTS.items():
        synth.make_drop(drops, day, count, width=512, height=3000, seed=SEEDS[day])
    for k, (day, count) in enumerate(EXTRA.items()):
        synth.make_drop(drops, day, count, width=512, height=3000, seed=200 + k)
    logs = ARTIFACTS / "e2e"
    shutil.rmtree(logs, ignore_errors=True)

    try:
        with sigterm_as_interrupt(), fresh_database() as metadata_url, \
                fresh_database() as results_url:
            env = {
                # Airflow maps postgresql:// to its "postgres" connection type.
                "AIRFLOW_CONN_IMAGE_ETL_DB": results_url.replace("postgresql+psycopg2://", "postgresql://"),
                "IMAGE_ETL_DROP_DIR": str(drops / "{date}"),
                "IMAGE_ETL_OUTPUT_DIR": str(base / "out" / "{date}"),
                "IMAGE_ETL_MODEL": str(DEMO_MODEL),
                "IMAGE_ETL_DEVICES": "cpu,cpu",
                "IMAGE_ETL_SETTLE_SECONDS": "0",
                "IMAGE_ETL_BATCH_SIZE": "2",
                "IMAGE_ETL_LOCK_DIR": str(base / "locks"),
                # The fleet's "GPUs" (two CPU devices here): the slots the plugin gives the pool.
                "IMAGE_ETL_GPUS": "2",
                # The drop-ready gate's triggerer looks for the marker every 2 s (default 30).
                "IMAGE_ETL_DROP_POLL_S": "2",
            }
            stack = AirflowStack(home=base / "airflow_home", artifacts=logs, metadata_url=metadata_url,
                                 extra_env=env, gpu_pool_slots=None)
            with stack:
                with stack.client() as client:
                    yield E2E(stack=stack, client=client, base=base, drops=drops, results_url=results_url)
            assert stack.strays() == [], "processes of the stack outlived stop()"
    except PostgresUnavailable as e:
        _unavailable(f"PostgreSQL is not available: {e}")


# --- helpers -----------------------------------------------------------------------------------

def _check(response: httpx.Response, *ok: int) -> Any:
    assert response.status_code in (ok or (200,)), \
        f"{response.request.method} {response.request.url}: {response.status_code} {response.text[:2000]}"
    return response.json()


def _task_log_tails(e2e: E2E, run_id: str) -> str:
    """The end of every failed task's log of a run, for the assertion message."""
    tis = _check(e2e.client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances"))["task_instances"]
    out = [f"{t['task_id']}[{t['map_index']}]={t['state']}" for t in tis]
    for t in tis:
        if t["state"] not in ("success", "skipped"):
            folder = e2e.stack.artifacts / "task-logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / \
                f"task_id={t['task_id']}"
            for log in sorted(folder.rglob("*.log")):
                out.append(f"--- {log.relative_to(folder)} ---\n" +
                           "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
    return "\n".join(out)


def _wait_run(e2e: E2E, run_id: str, timeout_s: float) -> dict:
    def finished():
        run = _check(e2e.client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}"))
        return run if run["state"] in ("success", "failed") else None

    run = wait_for(f"run {run_id}", finished, timeout_s, poll_s=2,
                   on_timeout=lambda: _task_log_tails(e2e, run_id))
    assert run["state"] == "success", f"run {run_id} failed:\n{_task_log_tails(e2e, run_id)}"
    return run


def _mapped_infer(e2e: E2E, run_id: str) -> list[dict]:
    tis = _check(e2e.client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/infer/listMapped"))
    return sorted(tis["task_instances"], key=lambda t: t["map_index"])


def _xcom(e2e: E2E, run_id: str, task_id: str) -> dict:
    entry = _check(e2e.client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/"
                                  "return_value", params={"deserialize": "true"}))
    return entry["value"]


def _discovered(e2e: E2E, run_id: str) -> dict:
    return _xcom(e2e, run_id, "discover")


def _xcom_count(e2e: E2E, run_id: str) -> int:
    return _check(e2e.client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/~/xcomEntries"))[
        "total_entries"]


def _of(rows: dict[str, list[tuple]], day: dt.date) -> dict[str, list[tuple]]:
    return {kind: [r for r in found if r[0] == day.isoformat()] for kind, found in rows.items()}


def _drop_names(e2e: E2E, day: dt.date) -> list[str]:
    return sorted(p.name for p in (e2e.drops / day.isoformat()).glob("*.jpg"))


def _assert_labels(tis: list[dict], images: int, shards: int) -> None:
    assert [t["map_index"] for t in tis] == list(range(shards))
    counts = []
    for k, t in enumerate(tis):
        assert t["state"] == "success", t
        match = LABEL.match(t["rendered_map_index"] or "")
        assert match, f"map_index_template not rendered: {t['rendered_map_index']!r}"
        assert (int(match.group(1)), int(match.group(2))) == (k + 1, shards), match.group(0)
        counts.append(int(match.group(3)))
    assert sum(counts) == images and min(counts) >= 1, counts
    assert len({t["rendered_map_index"] for t in tis}) == len(tis)  # every label its own


def _executed(stack: AirflowStack, worker: str) -> list[re.Match]:
    return [m for m in EXECUTED.finditer(stack.log_text(worker)) if m["dag"] == DAG_ID]


# --- the tests ------------------------------------------------------------------------------------

def test_triggered_run_with_conf(e2e: E2E):
    stack, client = e2e.stack, e2e.client
    # Authentication is real: no token, no API.
    assert httpx.get(f"{stack.base_url}/api/v2/dags/{DAG_ID}", timeout=30).status_code == 401

    assert _check(client.get("/importErrors"))["total_entries"] == 0
    # A fresh install: nobody made the gpu pool; the plugin did when the scheduler started.
    pool = _check(client.get("/pools/gpu"))
    assert pool["slots"] == 2 and "image_etl plugin" in pool["description"], pool
    # Whichever component with database access started first made it (the triggerer too).
    assert "pool 'gpu' did not exist: created it with 2 slot(s)" in stack.log_text("scheduler") + \
        stack.log_text("dag-processor") + stack.log_text("triggerer")
    assert _check(client.patch(f"/dags/{DAG_ID}", json={"is_paused": False}))["is_paused"] is False

    conf = {"date": D2.isoformat(), "drop_dir": str(e2e.drops / "{date}"),
            "output_dir": str(e2e.base / "manual-out" / "{date}"), "model_path": str(DEMO_MODEL),
            "devices": "cpu,cpu", "settle_seconds": 0, "batch_size": 2}
    trigger = {"dag_run_id": MANUAL_RUN, "logical_date": _cron_tick(D3), "conf": conf}
    created = _check(client.post(f"/dags/{DAG_ID}/dagRuns", json=trigger))
    assert created["conf"] == conf and created["run_type"] == "manual"
    _wait_run(e2e, MANUAL_RUN, RUN_TIMEOUT_S)

    rows = _rows(e2e.results_url)
    names = _drop_names(e2e, D2)
    assert len(names) == COUNTS[D2]
    assert [(r[0], r[1], r[3]) for r in rows["images"]] == [(D2.isoformat(), n, "ok") for n in names]
    # The conf's output folder was used: one txt per image.
    labels = e2e.base / "manual-out" / D2.isoformat() / "labels"
    assert sorted(p.name for p in labels.glob("*.txt")) == sorted(Path(n).stem + ".txt" for n in names)
    assert not (e2e.base / "out").exists()

    # Two mapped infer tasks, one per cpu entry, labelled "<device> · <n> images",
    # on the gpu queue and in the gpu pool; the other tasks on the default queue and pool.
    infer = _mapped_infer(e2e, MANUAL_RUN)
    _assert_labels(infer, images=COUNTS[D2], shards=2)
    assert {(t["pool"], t["queue"]) for t in infer} == {("gpu", GPU_QUEUE)}
    tis = _check(client.get(f"/dags/{DAG_ID}/dagRuns/{MANUAL_RUN}/taskInstances"))["task_instances"]
    others = {t["task_id"]: (t["pool"], t["queue"], t["state"]) for t in tis if t["task_id"] != "infer"}
    assert others == {task: ("default_pool", DEFAULT_QUEUE, "success")
                      for task in ("wait_for_drop", "discover", "partition", "load", "report")}
    # ... and each worker ran only its queue's tasks.
    on_gpu = {(m["task"], int(m["map_index"])) for m in _executed(stack, "worker-gpu")
              if m["run"] == MANUAL_RUN}
    on_cpu = {m["task"] for m in _executed(stack, "worker-default") if m["run"] == MANUAL_RUN}
    assert on_gpu == {("infer", 0), ("infer", 1)}
    assert on_cpu == {"wait_for_drop", "discover", "partition", "load", "report"}

    e2e.snapshot = _of(rows, D2)
    assert e2e.snapshot["detections"], "the demo model found nothing on D2's images"
    e2e.done.add("trigger")


def test_backfill_reprocess_completed_keeps_rows_exact(e2e: E2E):
    if "trigger" not in e2e.done:
        pytest.fail("the triggered run did not succeed; the backfill's expectations build on it")
    client = e2e.client
    body = {"dag_id": DAG_ID, "from_date": f"{D1.isoformat()}T00:00:00Z",
            "to_date": f"{D3.isoformat()}T23:59:59Z", "reprocess_behavior": "completed",
            "max_active_runs": 3, "run_backwards": False, "dag_run_conf": {}}
    backfill = _check(client.post("/backfills", json=body))
    assert backfill["reprocess_behavior"] == "completed"

    def completed():
        state = _check(client.get(f"/backfills/{backfill['id']}"))
        return state if state["completed_at"] else None

    def progress() -> str:
        runs = _check(client.get(f"/dags/{DAG_ID}/dagRuns", params={"run_type": "backfill"}))["dag_runs"]
        return "\n".join(f"{r['dag_run_id']}: {r['state']}\n{_task_log_tails(e2e, r['dag_run_id'])}"
                         for r in runs)

    wait_for(f"backfill {backfill['id']}", completed, BACKFILL_TIMEOUT_S, poll_s=3, on_timeout=progress)

    runs = _check(client.get(f"/dags/{DAG_ID}/dagRuns", params={"run_type": "backfill"}))["dag_runs"]
    by_day = {dt.date.fromisoformat(r["logical_date"][:10]): r for r in runs}
    assert sorted(by_day) == [D1, D2, D3] and len(runs) == 3, [r["dag_run_id"] for r in runs]
    for day, run in by_day.items():
        assert run["logical_date"].startswith(_cron_tick(day)[:19]), run
        assert run["state"] == "success", f"{run['dag_run_id']}:\n{_task_log_tails(e2e, run['dag_run_id'])}"
    # "completed": D3's finished manual run was cleared and re-run, not duplicated.
    assert by_day[D3]["dag_run_id"] == MANUAL_RUN and by_day[D3]["conf"] == {}

    # What each run found: D1 and D3 new, D2 loaded already (by the manual run).
    found = {day: _discovered(e2e, run["dag_run_id"]) for day, run in by_day.items()}
    assert {day: (f["date"], f["images"], f["already_loaded"]) for day, f in found.items()} == {
        D1: (D1.isoformat(), COUNTS[D1], 0),
        D2: (D2.isoformat(), 0, COUNTS[D2]),
        D3: (D3.isoformat(), COUNTS[D3], 0)}

    # report: this run's counts beside the drop's. D2's run loaded nothing new.
    reports = {day: _xcom(e2e, run["dag_run_id"], "report") for day, run in by_day.items()}
    assert reports[D2]["run"]["images"] == 0 and reports[D2]["drop"]["images"] == COUNTS[D2]
    assert reports[D1]["run"]["images"] == reports[D1]["drop"]["images"] == COUNTS[D1]
    # One XCom per task instance (discover, partition, 2 x infer, load, report).
    assert _xcom_count(e2e, by_day[D1]["dag_run_id"]) == 6

    rows = _rows(e2e.results_url)
    for day in (D1, D3):
        assert [(r[1], r[3]) for r in _of(rows, day)["images"]] == [(n, "ok") for n in _drop_names(e2e, day)]
        _assert_labels(_mapped_infer(e2e, by_day[day]["dag_run_id"]), images=COUNTS[day], shards=2)
    assert _of(rows, D2) == e2e.snapshot  # untouched, detection by detection
    # No duplicates anywhere: one row per (date, image, model), one per (image, det_index).
    identities = [(r[0], r[1], r[2]) for r in rows["images"]]
    assert len(identities) == len(set(identities)) == sum(COUNTS.values())
    det_keys = [(r[0], r[1], r[2]) for r in rows["detections"]]
    assert len(det_keys) == len(set(det_keys))
    assert {r[0] for r in rows["images"]} == {d.isoformat() for d in COUNTS}

    # Every infer attempt of every run ran on the gpu worker, nothing else did.
    assert {m["task"] for m in _executed(e2e.stack, "worker-gpu")} == {"infer"}
    assert "infer" not in {m["task"] for m in _executed(e2e.stack, "worker-default")}
    e2e.done.add("backfill")


def _day_rows(e2e: E2E, day: dt.date) -> list[tuple[str, str]]:
    return [(r[1], r[3]) for r in _of(_rows(e2e.results_url), day)["images"]]


def _new_runs(e2e: E2E, before: set[str], **params: str) -> list[dict]:
    runs = _check(e2e.client.get(f"/dags/{DAG_ID}/dagRuns", params=params))["dag_runs"]
    return [r for r in runs if r["dag_run_id"] not in before]


def _run_ids(e2e: E2E) -> set[str]:
    return {r["dag_run_id"] for r in
            _check(e2e.client.get(f"/dags/{DAG_ID}/dagRuns", params={"limit": 100}))["dag_runs"]}


def test_rest_trigger_without_a_logical_date(e2e: E2E):
    """What the official client sends when no logical date is given: ``"logical_date": null``."""
    client = e2e.client
    created = _check(client.post(f"/dags/{DAG_ID}/dagRuns",
                                 json={"logical_date": None, "conf": {"date": D4.isoformat()}}))
    assert created["logical_date"] is None
    _wait_run(e2e, created["dag_run_id"], RUN_TIMEOUT_S)
    assert _day_rows(e2e, D4) == [(n, "ok") for n in _drop_names(e2e, D4)]
    assert _mapped_infer(e2e, created["dag_run_id"])[0]["rendered_map_index"] == \
        "shard 1/1 · cpu · 1 image"

    # No date at all: the day it was triggered (run_after), shifted by the offset.
    created = _check(client.post(f"/dags/{DAG_ID}/dagRuns",
                                 json={"logical_date": None, "conf": {"drop_date_offset_days": -1}}))
    _wait_run(e2e, created["dag_run_id"], RUN_TIMEOUT_S)
    triggered = dt.datetime.fromisoformat(created["run_after"]).astimezone(dt.UTC).date()
    expected = triggered - dt.timedelta(days=1)
    found = _discovered(e2e, created["dag_run_id"])
    assert (found["date"], found["images"]) == (expected.isoformat(), 1)
    assert _day_rows(e2e, expected) == [(n, "ok") for n in _drop_names(e2e, expected)]


def test_cli_trigger_without_a_logical_date(e2e: E2E):
    """The README's ``airflow dags trigger`` line: no --logical-date."""
    before = _run_ids(e2e)
    e2e.stack.airflow("dags", "trigger", DAG_ID, "--conf", json.dumps({"date": D5.isoformat()}))
    [run] = _new_runs(e2e, before, run_type="manual")
    assert run["logical_date"] is None and run["conf"] == {"date": D5.isoformat()}
    _wait_run(e2e, run["dag_run_id"], RUN_TIMEOUT_S)
    assert _day_rows(e2e, D5) == [(n, "ok") for n in _drop_names(e2e, D5)]


def _readme_backfill_command(first: dt.date, last: dt.date) -> list[str]:
    """The README's backfill example, exactly as written, with its two dates replaced."""
    [line] = re.findall(r"^airflow backfill create .*$", README.read_text(), flags=re.M)
    args = shlex.split(line)[1:]
    for flag, day in (("--from-date", first), ("--to-date", last)):
        k = args.index(flag) + 1
        args[k] = re.sub(r"^\d{4}-\d{2}-\d{2}", day.isoformat(), args[k])
    return args


def test_backfill_written_as_the_readme_shows_covers_every_date(e2e: E2E):
    client = e2e.client
    args = _readme_backfill_command(D6, D7)
    e2e.stack.airflow(*args)
    [backfill] = [b for b in _check(client.get("/backfills", params={"dag_id": DAG_ID}))["backfills"]
                  if b["from_date"].startswith(D6.isoformat())]

    def completed():
        state = _check(client.get(f"/backfills/{backfill['id']}"))
        return state if state["completed_at"] else None

    wait_for(f"backfill {backfill['id']}", completed, BACKFILL_TIMEOUT_S, poll_s=3)
    runs = [r for r in _check(client.get(f"/dags/{DAG_ID}/dagRuns",
                                         params={"run_type": "backfill", "limit": 100}))["dag_runs"]
            if r["logical_date"] and r["logical_date"][:10] in (D6.isoformat(), D7.isoformat())]
    assert sorted(r["logical_date"][:10] for r in runs) == [D6.isoformat(), D7.isoformat()], args
    for run in runs:
        assert run["state"] == "success", _task_log_tails(e2e, run["dag_run_id"])
    for day in (D6, D7):
        assert _day_rows(e2e, day) == [(n, "ok") for n in _drop_names(e2e, day)]


def test_bad_devices_are_refused_at_trigger_time(e2e: E2E):
    before = _run_ids(e2e)
    response = e2e.client.post(f"/dags/{DAG_ID}/dagRuns",
                               json={"logical_date": None, "conf": {"devices": "gpu7"}})
    assert response.status_code == 400, response.text
    assert "devices" in response.text and "gpu7" in response.text, response.text
    assert _run_ids(e2e) == before


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_ui_screenshots_grid_and_trigger_form(e2e: E2E):
    if not shutil.which("chromium"):
        _unavailable("Debian's chromium is not installed (apt-get install chromium)")
    params = _check(e2e.client.get(f"/dags/{DAG_ID}/details"))["params"]
    sections: dict[str, list[str]] = {}
    for spec in params.values():
        sections.setdefault(spec["schema"]["section"], []).append(spec["schema"]["title"])
    assert sum(map(len, sections.values())) == len(params) >= 12

    out = ARTIFACTS / "screenshots"
    shutil.rmtree(out, ignore_errors=True)
    base = e2e.stack.base_url
    with Chromium(e2e.base / "chromium-profile", ARTIFACTS / "e2e" / "chromium.log") as browser:
        # The UI takes the same JWT as the API, from its cookie.
        browser.call("Network.setCookie", name="_token", value=e2e.stack.token(), url=base)
        browser.goto(f"{base}/dags/{DAG_ID}")
        # The header's buttons may render after the grid (their labels load with the page's
        # translations): wait for the Trigger button too, rather than look once.
        browser.wait_for_text([DAG_ID, "discover", "partition", "infer", "load", "report",
                               "Trigger"], 120)
        grid = browser.screenshot(out / "grid.png")

        browser.click("document.querySelector('button[aria-label=\"Trigger Dag\"]')")
        browser.wait_for_text([f"Trigger Dag - {DAG_ID}", *sections], 60)
        shots = []
        for section, titles in sections.items():
            # The form's sections are an accordion: one open at a time. Click only when the
            # page is still (an opening section moves the others), then wait for it to open.
            trigger = ("Array.from(document.querySelectorAll('button[data-part=item-trigger]'))"
                       f".find(b => b.innerText.trim() === {section!r})")
            expanded = f"{trigger}?.getAttribute('aria-expanded') === 'true'"
            browser.wait_until_still()
            if not browser.evaluate(expanded):
                browser.click(trigger)
            wait_for(f"form section {section!r} to open",
                     lambda js=expanded: browser.evaluate(js), 30, poll_s=0.2)
            browser.wait_until_still()
            dialog = browser.wait_for_text(titles, 30)
            assert all(t in dialog for t in titles)
            height = browser.evaluate("Math.max(...Array.from(document.querySelectorAll('[role=dialog]'))"
                                      ".map(d => d.scrollHeight))")
            browser.resize(1600, max(1000, int(height) + 200))
            slug = re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")
            shots.append(browser.screenshot(out / f"trigger-form-{slug}.png"))
            browser.resize(1600, 1000)

    for png in (grid, *shots):
        width, height = _png_size(png)
        assert width == 1600 and height >= 1000 and png.stat().st_size > 20_000, (png, width, height)
    assert len(shots) == len(sections) == len({s.section for s in SETTINGS.values() if s.section})


# --- the Detections page (plugins/detections_plugin.py) ----------------------------------------

UI_DAY = _TODAY - dt.timedelta(days=20)
UI_RUN = "e2e_detections_page"
FRAME = "document.querySelector('iframe[title=\"Detections\"]')"


def _frame_eval(browser: Chromium, body: str):
    """Evaluate ``body`` (a function body of ``doc``) in the Detections iframe's document."""
    return browser.evaluate(f"(() => {{ const f = {FRAME}; const doc = f && f.contentDocument;"
                            f" if (!doc || !doc.body) return null; {body} }})()")


def _wait_frame(browser: Chromium, view: str, ready_js: str = "true", timeout_s: float = 90) -> None:
    wait_for(f"the Detections page ({view}) in the UI's iframe", lambda: _frame_eval(
        browser, f"return doc.body.dataset.ready === '1' && doc.body.dataset.view === {view!r}"
                 f" && ({ready_js});"), timeout_s, poll_s=0.5,
        on_timeout=lambda: "iframe text: " + str(_frame_eval(browser, "return doc.body.innerText;"))[:2000])


def _frame_table(browser: Chromium, table_id: str) -> dict[str, dict[str, int]]:
    """data-date → {data-field: number} of a table the page rendered (its text, not its data)."""
    rows = _frame_eval(browser, f"return [...doc.querySelectorAll('#{table_id} tbody tr')].map(tr =>"
                                " [tr.dataset.date, [...tr.querySelectorAll('[data-field]')]"
                                ".map(td => [td.dataset.field, td.textContent])]);")
    return {day: {field: int(text.replace(",", "")) for field, text in cells} for day, cells in rows}


def _db_nights(url: str) -> tuple[str, dict[str, dict[str, int]]]:
    """The latest model's nights, counted here from images and detections."""
    import json

    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            sha = conn.execute(sa.text("SELECT model_sha256 FROM images ORDER BY processed_at DESC "
                                       "LIMIT 1")).scalar_one()
            names = json.loads(conn.execute(sa.text("SELECT class_names FROM models WHERE sha256 = :s"),
                                            {"s": sha}).scalar_one())
            zeros = {f"class:{name}": 0 for name in names.values()}  # the page shows every class
            nights = {str(day)[:10]: {"images": n, "ok": ok, "failed": failed, "detections": 0, **zeros}
                      for day, n, ok, failed in conn.execute(sa.text(
                          "SELECT drop_date, count(*), sum(CASE WHEN status = 'ok' THEN 1 ELSE 0 END),"
                          " sum(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) FROM images"
                          " WHERE model_sha256 = :s GROUP BY drop_date"), {"s": sha})}
            for day, name, n in conn.execute(sa.text(
                    "SELECT i.drop_date, d.class_name, count(*) FROM detections d JOIN images i"
                    " ON i.id = d.image_id WHERE i.model_sha256 = :s GROUP BY i.drop_date, d.class_name"),
                    {"s": sha}):
                nights[str(day)[:10]][f"class:{name}"] = n
                nights[str(day)[:10]]["detections"] += n
    finally:
        engine.dispose()
    return sha, nights


def _db_rows(url: str, query: str, **params) -> list[tuple]:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(query), params)]
    finally:
        engine.dispose()


def test_detections_page_shows_the_runs_results(e2e: E2E):
    """The plugin through the real api-server: auth on its API, then in chromium as a logged-in
    user the nights (counts equal the results DB's), a night's failures, an image's viewer and
    the DAG-run tab, each screenshotted."""
    if "trigger" not in e2e.done:
        pytest.fail("the triggered run did not succeed; the page's data builds on it")
    if not shutil.which("chromium"):
        _unavailable("Debian's chromium is not installed (apt-get install chromium)")
    stack, client = e2e.stack, e2e.client
    # Airflow does not protect a plugin's routes: the plugin does, on every one.
    for path in ("/detections/", "/detections/static/app.js", "/detections/api/models",
                 f"/detections/api/nights?model={'0' * 64}", "/detections/api/images/1/thumbnail"):
        r = httpx.get(f"{stack.base_url}{path}", timeout=30)
        assert r.status_code == 401, (path, r.status_code, r.text[:300])
    plugins = {p["name"]: p for p in _check(client.get("/plugins"))["plugins"]}
    views = {v["destination"]: v for v in plugins["image_etl_detections"]["external_views"]}
    assert set(views) == {"nav", "dag", "dag_run"}
    assert _check(client.get("/plugins/importErrors"))["total_entries"] == 0

    # A night with a failed image: two images and a file that is not one.
    synth.make_drop(e2e.drops, UI_DAY, 2, width=512, height=3000, seed=120)
    (e2e.drops / UI_DAY.isoformat() / "not-an-image.jpg").write_bytes(b"this is not a JPEG\n" * 50)
    conf = {"date": UI_DAY.isoformat(), "drop_dir": str(e2e.drops / "{date}"),
            "output_dir": str(e2e.base / "ui-out" / "{date}"), "model_path": str(DEMO_MODEL),
            "devices": "cpu,cpu", "settle_seconds": 0, "batch_size": 2}
    _check(client.post(f"/dags/{DAG_ID}/dagRuns",
                       json={"dag_run_id": UI_RUN, "logical_date": _cron_tick(UI_DAY), "conf": conf}))
    _wait_run(e2e, UI_RUN, RUN_TIMEOUT_S)
    sha, truth = _db_nights(e2e.results_url)
    assert truth[UI_DAY.isoformat()]["failed"] == 1 and truth[UI_DAY.isoformat()]["ok"] == 2
    reasons = _db_rows(e2e.results_url, "SELECT rel_path, error FROM images WHERE status = 'failed'"
                                        " AND drop_date = :d", d=UI_DAY)
    # The image with the most detections of the triggered run's night (D2), and its boxes.
    [(image_id, rel_path, n_boxes)] = _db_rows(
        e2e.results_url, "SELECT i.id, i.rel_path, count(*) AS n FROM images i JOIN detections d"
                         " ON d.image_id = i.id WHERE i.drop_date = :d GROUP BY i.id, i.rel_path"
                         " ORDER BY n DESC, i.rel_path LIMIT 1", d=D2)
    run_truth = _db_rows(e2e.results_url, "SELECT count(*), sum(CASE WHEN status = 'failed' THEN 1 ELSE 0"
                                          " END) FROM images WHERE run_key = :k", k=f"{DAG_ID}/{UI_RUN}")

    out = ARTIFACTS / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    base = stack.base_url
    shots = {}
    with Chromium(e2e.base / "chromium-detections", ARTIFACTS / "e2e" / "chromium-detections.log") as browser:
        browser.call("Network.setCookie", name="_token", value=stack.token(), url=base)
        # The nav entry: the page in the UI's iframe, nights chart and table.
        browser.goto(f"{base}/plugin/detections")
        _wait_frame(browser, "nights", "!!doc.querySelector('#chart-images rect')")
        assert "Detections" in browser.text()  # the nav item
        rendered = _frame_table(browser, "nights-table")
        assert rendered == truth, (rendered, truth)
        assert _frame_eval(browser, "return doc.querySelectorAll('#chart-images rect').length;") >= len(truth)
        browser.wait_until_still()
        shots["nights"] = browser.screenshot(out / "detections-nights.png")

        # The night's failures, by the page's own link, with their reasons.
        _frame_eval(browser, f"doc.querySelector('tr[data-date=\"{UI_DAY.isoformat()}\"] "
                             "a[href*=\"view=failures\"]').click(); return true;")
        _wait_frame(browser, "failures", "!!doc.querySelector('#failures-table tbody tr')")
        shown = _frame_eval(browser, "return [...doc.querySelectorAll('#failures-table tbody tr')].map(tr =>"
                                     " [tr.querySelector('a').textContent,"
                                     " tr.querySelector('[data-field=error]').textContent]);")
        assert sorted(map(tuple, shown)) == sorted(reasons), (shown, reasons)
        shots["failures"] = browser.screenshot(out / "detections-failures.png")

        # One image's viewer: the server-made thumbnail with the DB's boxes, and a zoomed region.
        browser.goto(f"{base}/plugin/detections/detections/?view=image&id={image_id}")
        _wait_frame(browser, "image", "doc.querySelector('#thumb')?.dataset.loaded === '1'"
                                      " && !!doc.querySelector('#zoom')?.dataset.region")
        boxes = _frame_eval(browser, "return [Number(doc.querySelector('#thumb').dataset.boxes),"
                                     " doc.querySelectorAll('#detections-table tbody tr').length,"
                                     " Number(doc.querySelector('#zoom').dataset.boxes)];")
        assert boxes[0] == boxes[1] == n_boxes and boxes[2] >= 1, (boxes, n_boxes, rel_path)
        browser.wait_until_still()
        shots["viewer"] = browser.screenshot(out / "detections-viewer.png")

        # The DAG-run tab of the run just triggered: its images and counts.
        browser.goto(f"{base}/dags/{DAG_ID}/runs/{UI_RUN}/plugin/detections-run")
        _wait_frame(browser, "run", "!!doc.querySelector('#run-table tbody tr')")
        run_table = _frame_table(browser, "run-table")
        assert run_table == {UI_DAY.isoformat(): truth[UI_DAY.isoformat()]}, run_table
        assert [(v["images"], v["failed"]) for v in run_table.values()] == [tuple(run_truth[0])]
        listed = _frame_eval(browser, "return doc.querySelectorAll('#images-table tbody tr').length;")
        assert listed == run_truth[0][0]
        shots["run tab"] = browser.screenshot(out / "detections-run-tab.png")

        # The DAG tab shows the nights too.
        browser.goto(f"{base}/dags/{DAG_ID}/plugin/detections-dag")
        _wait_frame(browser, "nights", "!!doc.querySelector('#nights-table tbody tr')")
        assert _frame_table(browser, "nights-table") == truth

    for name, png in shots.items():
        width, height = _png_size(png)
        assert (width, height) == (1600, 1000) and png.stat().st_size > 20_000, (name, png, width, height)


# --- 5. the drop-ready gate and complete loads -----------------------------------------------------

GATE_DAY, GAP_DAY = _TODAY - dt.timedelta(days=30), _TODAY - dt.timedelta(days=31)


def _ti(e2e: E2E, run_id: str, task_id: str) -> dict:
    return _check(e2e.client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}"))


def _finished(e2e: E2E, run_id: str, timeout_s: float) -> dict:
    def done():
        run = _check(e2e.client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}"))
        return run if run["state"] in ("success", "failed") else None

    return wait_for(f"run {run_id}", done, timeout_s, poll_s=2,
                    on_timeout=lambda: _task_log_tails(e2e, run_id))


def _task_log(e2e: E2E, run_id: str, task_id: str) -> str:
    folder = e2e.stack.artifacts / "task-logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / \
        f"task_id={task_id}"
    return "\n".join(p.read_text(errors="replace") for p in sorted(folder.rglob("*.log*")))


def test_the_run_waits_in_the_triggerer_until_the_drop_is_marked_ready(e2e: E2E):
    client, run_id = e2e.client, "e2e_drop_gate"
    synth.make_drop(e2e.drops, GATE_DAY, 2, width=512, height=3000, seed=130)
    folder = e2e.drops / GATE_DAY.isoformat()
    _check(client.patch(f"/dags/{DAG_ID}", json={"is_paused": False}))
    conf = {"date": GATE_DAY.isoformat(), "drop_ready_marker": "_SUCCESS", "drop_wait_timeout": 900}
    _check(client.post(f"/dags/{DAG_ID}/dagRuns",
                       json={"dag_run_id": run_id, "logical_date": None, "conf": conf}))
    wait_for("wait_for_drop to be deferred", lambda: _ti(e2e, run_id, "wait_for_drop")["state"] ==
             "deferred", RUN_TIMEOUT_S, poll_s=2, on_timeout=lambda: _task_log_tails(e2e, run_id))
    # Deferred means the trigger waits in the triggerer: no worker slot, and nothing after it ran.
    assert _ti(e2e, run_id, "discover")["state"] in (None, "none")
    time.sleep(6)  # three looks by the triggerer, the marker still absent: it still waits
    assert _ti(e2e, run_id, "wait_for_drop")["state"] == "deferred"
    assert _check(client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}"))["state"] == "running"
    (folder / "_SUCCESS").write_text("")
    _wait_run(e2e, run_id, RUN_TIMEOUT_S)
    assert _day_rows(e2e, GATE_DAY) == [(n, "ok") for n in _drop_names(e2e, GATE_DAY)]
    log = _task_log(e2e, run_id, "wait_for_drop")
    assert f"waiting up to 900s for _SUCCESS in {folder}" in log
    assert f"drop ready: _SUCCESS found in {folder}" in log


def test_an_infer_marked_success_before_it_ran_fails_the_load_naming_its_shard(e2e: E2E):
    client, run_id = e2e.client, "e2e_marked_success"
    synth.make_drop(e2e.drops, GAP_DAY, 3, width=512, height=3000, seed=131)
    _check(client.patch(f"/dags/{DAG_ID}", json={"is_paused": False}))
    # No gpu slot: the mapped infer tasks wait in "scheduled" while one is marked by hand.
    def gpu_slots(n: int) -> None:
        body = {"pool": "gpu", "slots": n, "include_deferred": False}
        _check(client.patch("/pools/gpu", json=body, params={"update_mask": "slots"}))

    gpu_slots(0)
    try:
        _check(client.post(f"/dags/{DAG_ID}/dagRuns", json={
            "dag_run_id": run_id, "logical_date": None,
            "conf": {"date": GAP_DAY.isoformat(), "devices": "cpu,cpu"}}))

        def waiting():
            tis = _mapped_infer(e2e, run_id)
            return tis if len(tis) == 2 and all(t["state"] == "scheduled" for t in tis) else None

        wait_for("two mapped infer tasks waiting for the pool", waiting, RUN_TIMEOUT_S, poll_s=2,
                 on_timeout=lambda: _task_log_tails(e2e, run_id))
        # What the UI's "Mark as success" sends.
        marked = _check(client.patch(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/infer/1",
                                     json={"new_state": "success"}))
        assert [t["state"] for t in marked["task_instances"]] == ["success"], marked
    finally:
        gpu_slots(2)
    run = _finished(e2e, run_id, RUN_TIMEOUT_S)
    assert run["state"] == "failed", _task_log_tails(e2e, run_id)
    load = _ti(e2e, run_id, "load")
    assert load["state"] == "failed" and load["try_number"] == 1, load  # no retry can fix it
    assert [t["state"] for t in _mapped_infer(e2e, run_id)] == ["success", "success"]
    shard = _xcom(e2e, run_id, "partition")[1]
    skipped = [name for name, _ in json.loads(Path(shard["shard_file"]).read_text())["images"]]
    log = _task_log(e2e, run_id, "load")
    assert "IncompleteNightError" in log and "shard 1 (infer map index 1" in log, log[-3000:]
    assert f"{len(skipped)} image(s) without an outcome: {', '.join(skipped)}" in log
    assert _day_rows(e2e, GAP_DAY) == []  # nothing of the night committed
