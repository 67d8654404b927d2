"""Crash safety: SIGKILL the worker anywhere in a shard, SIGKILL the load inside its transaction,
restart PostgreSQL under a load; after a retry the txt files and the database must be exactly
what a clean run gives: nothing lost, nothing duplicated, no partial file, no partial load.

Real parts only: each stage runs the real ``image_etl.stages`` function in its own Python
process (as an Airflow task does), on the shipped demo model on the CPU, against a real
PostgreSQL. Kill points are driven by what the victim visibly does (its staging file, its txt
files, its backend in ``pg_stat_activity``) plus seeded random delays across the clean run's
measured timeline; every trial prints its point and the state it left, and
``IMAGE_ETL_CRASH_SEED`` replays a run's choices.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import secrets
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from image_etl import synth

from .conftest import DROP_DATE
from .crash_harness import (
    BATCH,
    IMAGES,
    SEED,
    WRITE_BYTES,
    Clean,
    KillPoint,
    LoadCase,
    Stage,
    TxPoint,
    check_retry,
    clean_run,
    db_state,
    drive,
    kill_points,
    load_case,
    load_previous,
    observe,
    pause_inside_atomic_write,
    prepare,
    reference_state,
    schema_url,
    schema_url_of,
    staged_records,
    temps_under,
    wait_for_no_backends,
    watch_load,
)
from .dbrows import result_rows
from .pg import PostgresUnavailable, _connect_admin, postgres_url, throwaway_cluster

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture(scope="module")
def drop(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash_drop")
    synth.make_drop(root, DROP_DATE, IMAGES, width=512, height=3000, seed=31337)
    return root


@pytest.fixture(scope="module")
def ref_db() -> Iterator[str]:
    yield from postgres_url()


@pytest.fixture
def db() -> Iterator[str]:
    """A fresh database for each test."""
    yield from postgres_url()


@pytest.fixture(scope="module")
def cleans(drop, ref_db, tmp_path_factory) -> Callable[[str], Clean]:
    """Clean runs by runtime, each made once."""
    made: dict[str, Clean] = {}

    def get(runtime: str) -> Clean:
        if runtime not in made:
            made[runtime] = clean_run(drop, schema_url(ref_db, f"clean_{runtime}"),
                                      tmp_path_factory.mktemp(f"crash_clean_{runtime}"), runtime)
        return made[runtime]

    return get


@pytest.fixture(scope="module")
def clean(cleans) -> Clean:
    """The clean run with the DAG's defaults."""
    return cleans("auto")


def test_worker_killed_anywhere_in_a_shard_retries_to_the_clean_result(drop, clean, db, tmp_path):
    rng = random.Random(SEED)
    points = kill_points(clean, rng)
    print(f"\nseed {SEED} (IMAGE_ETL_CRASH_SEED replays it); {len(points)} kill points")
    phases, parts = [], set()
    for k, point in enumerate(points):
        work = tmp_path / f"trial-{k:02d}"
        run = prepare(drop, work)
        victim = Stage(run.infer_job(), work, "infer-killed")
        _, left = drive(victim, run, point)
        assert left is not None
        temps = len(temps_under(run.out))
        phase = left.phase(IMAGES, temps)
        phases.append(phase)
        parts.add(left.part(IMAGES))
        print(f"trial {k:2d} {point.aim:27s} kill at {point.describe():15s} "
              f"{victim.elapsed():5.2f}s → {phase}")
        retry = Stage(run.infer_job(), work, "infer-retry").result()
        # The retry reuses exactly the records the killed attempt completed (a torn line is not one).
        assert retry["resumed"] == left.staged, victim.output()[-3000:]
        check_retry(clean, run, retry, schema_url(db, f"trial_{k:02d}"))
    # Kills follow observed progress, so every part of the shard is hit whatever the machine's
    # speed (the exact phase inside a part depends on the scheduler: see the printed list).
    assert parts == {"start", "pipeline open, nothing written", "middle", "end"}, phases


# "torch": the runtime of GPU workers (and of CPUs without OpenVINO), where a batch's size and
# the thread count change the numbers, so a retry must feed the model the same batches.
@pytest.mark.parametrize("runtime", ["auto", "torch"])
def test_kills_inside_a_write_retry_to_the_clean_result(drop, cleans, db, tmp_path, runtime):
    """The microsecond windows random kills seldom hit, made certain.

    - Inside atomic_write, between open and rename: it leaves ``.<name>.<host>.<pid>.<tid>.tmp``.
      Processes that do nothing but rewrite a big file with atomic_write are SIGKILLed
      instead, beside a killed shard: in its txt folder and in its run folder. Meanwhile a live
      writer in the run folder (another shard's, say) must not lose its temp file to the
      retry's clean-up.
    - Between an image's txt rename and its staging line, half-way through a batch, and in the
      middle of that line: the state such a kill leaves is replayed on a really killed shard
      by cutting its staging file back (the txt files stay: they are renamed first).
    """
    clean = cleans(runtime)
    run = prepare(drop, tmp_path, runtime)
    victim = Stage(run.infer_job(), tmp_path, "infer-killed")
    _, left = drive(victim, run, KillPoint("mid-inference", "txt", count=IMAGES // 2))
    assert left is not None and 3 <= left.staged < IMAGES
    lines = [line for line in run.staging.read_bytes().splitlines(keepends=True)
             if line.endswith(b"\n")]
    keep = len(lines) - 1 if len(lines) % 2 else len(lines) - 2  # header + an odd number
    run.staging.write_bytes(b"".join(lines[:keep]) + lines[keep][:len(lines[keep]) // 2])
    cut = observe(run)
    assert cut.staged % BATCH == 1 and cut.txt > cut.staged and cut.torn
    print(f"\nstate replayed: {cut.phase(IMAGES)}")

    not_done = sorted(set(clean.staged) - set(staged_records(run.staging)))[-1]
    targets = [run.out / "labels" / Path(not_done).with_suffix(".txt"), run.report]
    leftovers = []
    for target in targets:
        writer, temp = pause_inside_atomic_write(target, tmp_path)
        writer.kill()
        writer.wait(timeout=30)
        leftovers.append(temp)
    print(f"left by kills inside atomic_write: {leftovers}")
    assert temps_under(run.out) == sorted(str((t.parent / n).relative_to(run.out))
                                          for t, n in zip(targets, leftovers))

    # A live writer (paused, as on a stalled disk) in the middle of another shard's file.
    other = Path(run.shard["run_dir"]) / "shard-001.report.json"
    stop = tmp_path / "stop-writing"
    live, live_temp = pause_inside_atomic_write(other, tmp_path, stop)
    try:
        retry = Stage(run.infer_job(), tmp_path, "infer-retry").result()
        live_temp_kept = (other.parent / live_temp).exists()
    finally:
        stop.touch()
        live.send_signal(signal.SIGCONT)
        live_rc = live.wait(timeout=60)
    assert live_temp_kept, "the retry deleted a live writer's temp file"
    # The live writer's rename went through (it would have failed had its temp file gone).
    assert live_rc == 0, (tmp_path / "writer.log").read_text()[-2000:]
    assert other.stat().st_size == WRITE_BYTES
    assert retry["resumed"] == cut.staged
    check_retry(clean, run, retry, schema_url(db, runtime))


@pytest.fixture(scope="module")
def case(clean, tmp_path_factory) -> LoadCase:
    return load_case(clean, tmp_path_factory.mktemp("crash_load"))


def test_load_killed_inside_its_transaction_leaves_the_previous_load(case, db, tmp_path):
    rng = random.Random(SEED + 1)
    new = reference_state(case, schema_url(db, "reference"))
    previous = load_previous(case, db)
    assert previous["tables"] and previous != new and new["images"][0] > 19_000
    database = make_url(db).database
    anywhere = ("active", "idle in transaction")
    first_load = [
        TxPoint("reading the staging files", "INSERT INTO models", ("idle in transaction",)),
        TxPoint("COPY into the stage table", "COPY image_etl_stage_images"),
        TxPoint("upserting the images", "INSERT INTO images"),
        TxPoint("COPY detections", "COPY detections", delay=rng.uniform(0, 0.3)),
        TxPoint("random", "", anywhere, delay=rng.uniform(0, 1.5)),
    ]
    reload_ = [  # the same load again: it replaces a complete load
        TxPoint("deleting the old detections", "DELETE FROM detections"),
        TxPoint("COPY detections", "COPY detections", delay=rng.uniform(0, 0.3)),
        TxPoint("random", "", anywhere, delay=rng.uniform(0, 1.5)),
    ]
    print(f"\nseed {SEED + 1}; big load: {new['images'][0]} images, {new['detections'][0]} boxes")
    admin = _connect_admin(db)
    try:
        for name, points in (("first", first_load), ("reload", reload_)):
            for k, point in enumerate(points):
                before = db_state(db)
                stage = Stage(case.job(db), tmp_path, f"load-{name}-{k}")
                seen = watch_load(stage, admin, database, point, stage.kill)
                assert stage.proc.returncode == -signal.SIGKILL
                wait_for_no_backends(admin, database)
                after = db_state(db)
                outcome = ("the state before" if after == before else
                           "the new load, complete" if after == new else "PARTIAL")
                print(f"{name} load, kill aimed at {point.aim:28s} (+{point.delay * 1000:3.0f}ms), "
                      f"session then {seen} → {outcome}")
                # Never a partial load. Killed mid-statement, nothing of it may show; after a
                # delay the kill may race the commit, and then the whole new load is there.
                assert after == before or (point.delay and after == new), outcome
            retry = Stage(case.job(db), tmp_path, f"load-{name}-retry").result()
            assert retry["images"] == new["images"][0]
            assert db_state(db) == new
    finally:
        admin.close()
    assert result_rows(db) == result_rows(schema_url_of(db, "reference"))


def test_postgres_restart_in_the_middle_of_a_load(case, tmp_path):
    stack = contextlib.ExitStack()
    try:
        cluster = stack.enter_context(throwaway_cluster())  # never the shared server
    except PostgresUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"no throwaway PostgreSQL cluster: {e} (CI is set: refusing to skip)")
        pytest.skip(f"no throwaway PostgreSQL cluster: {e}")
    with stack:
        admin = _connect_admin(cluster.url)
        with admin.cursor() as cur:
            cur.execute("CREATE DATABASE crash")
            cur.execute("CREATE DATABASE reference")
        admin.close()
        password = "pw-" + secrets.token_hex(8)  # trust auth ignores it; no message may show it
        base = make_url(cluster.url).set(password=password)
        url = base.set(database="crash").render_as_string(hide_password=False)
        reference = base.set(database="reference").render_as_string(hide_password=False)
        new = reference_state(case, reference)
        previous = load_previous(case, url)

        # Once under a COPY (raw driver connection), once under a statement SQLAlchemy runs.
        for k, point in enumerate([TxPoint("COPY detections", "COPY detections"),
                                   TxPoint("upserting the images", "INSERT INTO images")]):
            stage = Stage(case.job(url), tmp_path, f"load-restarted-{k}")
            admin = _connect_admin(cluster.url)
            try:
                seen = watch_load(stage, admin, "crash", point, cluster.restart)
            finally:
                admin.close()
            rc = stage.wait()
            output = stage.output()
            # The exception the task dies of, from its traceback on (psycopg2 itself prints the
            # server's message to stderr as a COPY fails, before that: not the task's error).
            tail = output[output.find("Traceback (most recent call last):"):]
            errors = [line for line in tail.splitlines()
                      if re.match(r"^[\w.]+(Error|Exception): ", line)]
            print(f"\nrestarted PostgreSQL at {point.aim} (session then {seen}); the load "
                  f"exited {rc}; its error(s):\n" + "\n".join(errors))
            assert rc != 0
            assert password not in output
            # One clear error: a StoreError naming the database (password hidden) and why,
            # chained to at most the driver's first error; not a chain of follow-up failures
            # ending in the rollback's "connection already closed".
            assert errors and errors[-1].startswith("image_etl.store.StoreError: "), tail[-5000:]
            assert "lost the connection" in errors[-1] and ":***@" in errors[-1]
            assert re.search("terminating connection due to administrator command|server closed "
                             "the connection unexpectedly", errors[-1]), errors[-1]
            assert len(errors) <= 2 and "already closed" not in output, tail[-5000:]
            assert db_state(url) == previous  # the load rolled back whole
        retry = Stage(case.job(url), tmp_path, "load-retry").result()
        assert retry["images"] == new["images"][0]
        assert db_state(url) == new
        assert result_rows(url) == result_rows(reference)


def test_clean_reference_is_what_the_stages_wrote(clean):
    """Guards the reference itself: one row per image, every box in the DB and in the txt."""
    assert [r[1] for r in clean.rows["images"]] == sorted(clean.staged)
    assert all(r[0] == DROP_DATE.isoformat() and r[3] == "ok" for r in clean.rows["images"])
    boxes = sum(len(body.splitlines()) for body in clean.files.values())
    assert boxes == len(clean.rows["detections"]) == clean.loaded["detections"] > 0

