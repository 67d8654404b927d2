"""The crash tests' harness: each stage in its own Python process, kill points driven by what
the victim visibly does, and the state a killed stage leaves (files, rows, backends).

See tests/test_crash.py for what is tested with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from image_etl import stages
from image_etl.staging import StagingWriter, read_staging

from .conftest import DEMO_MODEL, DROP_DATE, ROOT
from .dbrows import result_rows

IMAGES = 24  # 12 batches of 2: a shard long enough to land kills between and inside batches
BATCH = 2
DAG_ID = "nightly_detections"
RUN_ID = "manual__crash_test"
SEED = int(os.environ.get("IMAGE_ETL_CRASH_SEED", "20261120"))
BULK_COPIES = 800  # the load tests' staging file: 24 real records x 801 → ~19k images, ~110k boxes
POLL_S = 0.002
STAGE_TIMEOUT_S = 180


# The child: one stage, as an Airflow task would run it. DEBUG logs go to the child's log file
# (which a failing test prints); the result comes back as the last stdout line.
RUNNER = r"""
import json, logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout,
                    format="%(relativeCreated)9.1f %(threadName)s %(name)s: %(message)s")
for noisy in ("PIL", "matplotlib", "urllib3", "h5py", "sqlalchemy"):  # sqlalchemy: every row
    logging.getLogger(noisy).setLevel(logging.WARNING)
from image_etl import stages
job = json.loads(open(sys.argv[1], encoding="utf-8").read())
if job["stage"] == "infer":
    result = stages.infer(job["shard"])
else:
    result = stages.load(job["discovered"], job["results"], db_url=job["db_url"],
                         dag_id=job["dag_id"])
print("RESULT " + json.dumps(result), flush=True)
"""


class Stage:
    """One pipeline stage in its own Python process; stdout and stderr go to a log file."""

    def __init__(self, job: dict[str, Any], workdir: Path, name: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        job_file = workdir / f"{name}.job.json"
        job_file.write_text(json.dumps(job))
        self.name = name
        self.log_path = workdir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(job_file)], cwd=ROOT,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "YOLO_OFFLINE": "1"})
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> int:
        """SIGKILL (nothing runs after it: no finally, no atexit); the exit status."""
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(timeout=30)

    def wait(self, timeout: float = STAGE_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} hung for {timeout}s:\n{self.output()[-3000:]}") from None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def result(self) -> dict[str, Any]:
        rc = self.wait()
        assert rc == 0, f"{self.name} failed ({rc}):\n{self.output()[-5000:]}"
        lines = [line for line in self.output().splitlines() if line.startswith("RESULT ")]
        return json.loads(lines[-1][len("RESULT "):])


def params(drop: Path, out: Path, runtime: str = "auto") -> dict[str, Any]:
    """The DAG's params, as tests/test_dag.py gives them; ``runtime`` other than the default
    ("auto": OpenVINO on a CPU when installed) forces one."""
    return {"drop_dir": str(drop / "{date}"), "output_dir": str(out / "{date}"), "devices": "cpu",
            "settle_seconds": 0, "batch_size": BATCH, "model_path": str(DEMO_MODEL),
            **({"runtime": runtime} if runtime != "auto" else {})}


@dataclasses.dataclass
class Run:
    """One DAG run's discover and partition results, in its own output folder."""

    discovered: dict[str, Any]
    shard: dict[str, Any]

    @property
    def out(self) -> Path:
        return Path(self.discovered["settings"]["output_dir"])

    @property
    def staging(self) -> Path:
        return Path(self.shard["run_dir"]) / f"shard-{self.shard['index']:03d}.staged.jsonl"

    @property
    def report(self) -> Path:
        return Path(self.shard["run_dir"]) / f"shard-{self.shard['index']:03d}.report.json"

    def infer_job(self) -> dict[str, Any]:
        return {"stage": "infer", "shard": self.shard}


def prepare(drop: Path, workdir: Path, runtime: str = "auto") -> Run:
    discovered = stages.discover(params(drop, workdir / "out", runtime), run_id=RUN_ID,
                                 run_date=DROP_DATE, db_url=None)
    [shard] = stages.partition(discovered)
    assert shard["images"] == IMAGES
    return Run(discovered, shard)


def is_temp(name: str) -> bool:
    """A temp file of atomic_files.atomic_write (``.<name>.<...>.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")


def temps_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if is_temp(p.name))


def output_files(out: Path) -> dict[str, bytes]:
    """Every file under labels/ (txt files, and any temp file beside them) → its bytes."""
    labels = out / "labels"
    return {str(p.relative_to(labels)): p.read_bytes() for p in sorted(labels.rglob("*"))
            if p.is_file()}


def staged_records(path: Path) -> dict[str, dict[str, Any]]:
    return {r["rel_path"]: r for r in read_staging(path)[1]}


@dataclasses.dataclass(frozen=True)
class Progress:
    staging: bool  # the staging file exists: the model is loaded and the pipeline opened
    staged: int  # complete records in it
    torn: bool  # its last line is cut off
    txt: int  # txt files in place
    reported: bool  # the shard's report is written: run_shard has returned

    def phase(self, n: int, temps: int = 0) -> str:
        """Where a kill that left this state hit (single writer, txt renamed before staging)."""
        if self.reported:
            return "after the shard finished (report written, process not yet gone)"
        if not self.staging:
            return "model load (no output yet)"
        # One writer, batches of BATCH written back to back: an odd count is a batch half written.
        if self.txt != self.staged or self.torn or temps or self.staged % BATCH:
            return f"writing (txt {self.txt}, staged {self.staged}, torn {self.torn}, temps {temps})"
        if self.staged == n:
            return "right after the last write"
        if self.staged == 0:
            return "decode / first batch (pipeline open, nothing written)"
        return f"inference ({self.staged} of {n} written, writer idle)"

    def part(self, n: int) -> str:
        """The coarse part of the shard a kill hit."""
        if not self.staging:
            return "start"
        if self.txt == self.staged == 0:
            return "pipeline open, nothing written"
        return "end" if self.txt == n else "middle"


def observe(run: Run) -> Progress:
    try:
        data = run.staging.read_bytes()
    except FileNotFoundError:
        data = None
    labels = run.out / "labels"
    try:
        txt = sum(1 for e in os.scandir(labels) if e.name.endswith(".txt") and not is_temp(e.name))
    except FileNotFoundError:
        txt = 0
    return Progress(staging=data is not None, staged=max((data or b"").count(b"\n") - 1, 0),
                    torn=bool(data) and not data.endswith(b"\n"), txt=txt,
                    reported=run.report.exists())


@dataclasses.dataclass(frozen=True)
class KillPoint:
    """Kill ``delay`` seconds after ``event``: "start" (spawned), "staging" (pipeline open) or
    "txt" (``count`` txt files in place)."""

    aim: str
    event: str
    count: int = 0
    delay: float = 0.0

    def happened(self, p: Progress) -> bool:
        return {"start": True, "staging": p.staging, "txt": p.txt >= self.count}[self.event]

    def describe(self) -> str:
        what = f"txt>={self.count}" if self.event == "txt" else self.event
        return f"{what}+{self.delay * 1000:.0f}ms"


@dataclasses.dataclass
class Timeline:
    """When things happened in a clean infer process (seconds since it was spawned)."""

    staging: float = 0.0
    first_txt: float = 0.0
    last_txt: float = 0.0
    report: float = 0.0
    exit: float = 0.0


def drive(stage: Stage, run: Run, point: KillPoint | None) -> tuple[Timeline, Progress | None]:
    """Watch an infer process; SIGKILL it at ``point`` (None: let it finish). A kill that comes
    after the shard's report is written happens at once: every trial really kills."""
    seen = Timeline()
    fire_at: float | None = None
    while True:
        now = stage.elapsed()
        p = observe(run)
        if p.staging and not seen.staging:
            seen.staging = now
        if p.txt and not seen.first_txt:
            seen.first_txt = now
        if p.txt == IMAGES and not seen.last_txt:
            seen.last_txt = now
        if p.reported and not seen.report:
            seen.report = now
        if point is not None:
            if fire_at is None and point.happened(p):
                fire_at = now + point.delay
            if p.reported or (fire_at is not None and now >= fire_at):
                rc = stage.kill()
                assert rc == -signal.SIGKILL, f"{stage.name} exited ({rc}) before the kill"
                return seen, observe(run)
        if not stage.running():
            seen.exit = now
            return seen, None
        # While the pipeline runs, look without pausing: a batch's files are written within a
        # millisecond, and a sleeping watcher on a busy machine wakes up tens of ms late.
        if point is None or not p.staging:
            time.sleep(POLL_S)


def schema_url(db_url: str, schema: str) -> str:
    """``db_url`` with its own, new schema first on the search path (a clean slate)."""
    engine = sa.create_engine(db_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    finally:
        engine.dispose()
    return schema_url_of(db_url, schema)


def schema_url_of(db_url: str, schema: str) -> str:
    return (make_url(db_url).update_query_dict({"options": f"-csearch_path={schema}"})
            .render_as_string(hide_password=False))


def db_state(url: str) -> dict[str, Any]:
    """The whole results DB, compact: counts and digests of result_rows' columns (server side,
    as 130k rows through Python per look would be slow), and the runs and models rows."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("images"):
                return {"tables": False}
            images = conn.exec_driver_sql(
                "SELECT count(*), md5(string_agg(ROW(drop_date, rel_path, model_sha256, status, "
                "error, width, height, bytes)::text, E'\\n' ORDER BY drop_date, rel_path, "
                "model_sha256)) FROM images").one()
            dets = conn.exec_driver_sql(
                "SELECT count(*), md5(string_agg(ROW(i.drop_date, i.rel_path, d.det_index, "
                "d.class_id, d.class_name, d.confidence, d.x1, d.y1, d.x2, d.y2, d.xc, d.yc, d.w, "
                "d.h)::text, E'\\n' ORDER BY i.drop_date, i.rel_path, i.model_sha256, "
                "d.det_index)) FROM detections d JOIN images i ON i.id = d.image_id").one()
            runs = conn.exec_driver_sql(
                "SELECT run_key, dag_id, run_id, drop_date::text, model_sha256, settings, images, "
                "ok, failed, detections, infer_seconds FROM runs ORDER BY run_key").all()
            models = conn.exec_driver_sql(
                "SELECT sha256, name, path, class_names FROM models ORDER BY sha256").all()
    finally:
        engine.dispose()
    return {"tables": True, "images": tuple(images), "detections": tuple(dets),
            "runs": [tuple(r) for r in runs], "models": [tuple(r) for r in models]}


def backends(admin_conn: Any, database: str) -> list[tuple[int, bool, str, str]]:
    """(pid, in a transaction, state, statement) of the sessions in ``database`` but ours."""
    with admin_conn.cursor() as cur:
        cur.execute("SELECT pid, xact_start IS NOT NULL, coalesce(state, ''), "
                    "left(coalesce(query, ''), 60) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()", (database,))
        return cur.fetchall()


def wait_for_no_backends(admin_conn: Any, database: str, timeout_s: float = 60) -> None:
    """A killed client's backend notices the closed socket and rolls back; wait for that."""
    deadline = time.monotonic() + timeout_s
    while backends(admin_conn, database):
        assert time.monotonic() < deadline, f"backends linger: {backends(admin_conn, database)}"
        time.sleep(0.02)


@dataclasses.dataclass
class Clean:
    """What an uninterrupted run gives: the reference every retry is compared with."""

    run: Run
    infer: dict[str, Any]
    timeline: Timeline
    files: dict[str, bytes]
    staged: dict[str, dict[str, Any]]
    loaded: dict[str, Any]
    rows: dict[str, list[tuple]]


def clean_run(drop: Path, db_url: str, workdir: Path, runtime: str) -> Clean:
    # Twice: the first process starts cold (its timeline would mislead the random kill points),
    # and two clean runs must agree byte for byte or no retry could be compared with one.
    first = prepare(drop, workdir / "first", runtime)
    Stage(first.infer_job(), workdir / "first", "clean-infer").result()
    run = prepare(drop, workdir / "second", runtime)
    stage = Stage(run.infer_job(), workdir / "second", "clean-infer")
    timeline, _ = drive(stage, run, None)
    result = stage.result()
    assert result["processed"] == result["ok"] == IMAGES and result["resumed"] == 0
    assert output_files(run.out) == output_files(first.out)
    assert staged_records(run.staging) == staged_records(first.staging)
    loaded = stages.load(run.discovered, [result], db_url=db_url, dag_id=DAG_ID)
    files = output_files(run.out)
    assert len(files) == IMAGES and sum(map(len, files.values())) > 0  # detections were made
    header = read_staging(run.staging)[0] or {}
    print(f"\nclean infer process (runtime {runtime}: {header.get('runtime', 'torch')}): pipeline "
          f"open at {timeline.staging:.2f}s, first txt {timeline.first_txt:.2f}s, last txt "
          f"{timeline.last_txt:.2f}s, report {timeline.report:.2f}s, exit {timeline.exit:.2f}s; "
          f"{loaded}")
    return Clean(run, result, timeline, files, staged_records(run.staging),
                 {k: loaded[k] for k in ("images", "ok", "failed", "detections")},
                 result_rows(db_url))


def kill_points(clean: Clean, rng: random.Random) -> list[KillPoint]:
    t = clean.timeline
    batch_s = max((t.last_txt - t.first_txt) / (IMAGES // BATCH - 1), 0.005)
    points = [
        KillPoint("model load", "start", delay=rng.uniform(0.1, 0.6) * t.staging),
        KillPoint("decode", "staging"),
        KillPoint("first batch", "staging", delay=rng.uniform(0.3, 0.9) * (t.first_txt - t.staging)),
        KillPoint("mid-inference", "txt", count=rng.randrange(2, IMAGES // 2, 2),
                  delay=rng.uniform(0.2, 0.8) * batch_s),
        # A batch's two files are written within a millisecond: kill on seeing the first one.
        # Whether the kill lands before the second depends on the scheduler (see the phase).
        KillPoint("mid-writing", "txt", count=rng.randrange(3, IMAGES // 2, 2)),
        KillPoint("mid-writing", "txt", count=rng.randrange(IMAGES // 2 + 1, IMAGES, 2)),
        KillPoint("right after the last write", "txt", count=IMAGES),
    ]
    # Random points over a clean process's measured life: two while it starts, three across
    # its pipeline (from the moment the staging file appears to the report).
    points += [KillPoint("random", "start", delay=rng.uniform(0, t.staging)) for _ in range(2)]
    points += [KillPoint("random", "staging", delay=rng.uniform(0, t.report - t.staging))
               for _ in range(3)]
    return points


def check_retry(clean: Clean, run: Run, retry: dict[str, Any], url: str) -> None:
    """The retried shard and its load are exactly the clean run's."""
    assert retry["resumed"] + retry["processed"] == IMAGES and retry["failed"] == 0
    assert output_files(run.out) == clean.files  # every txt byte-identical, no extra file
    assert temps_under(run.out) == []
    lines = run.staging.read_text().splitlines()
    assert len(lines) == 1 + IMAGES, "an image is staged twice (or not at all)"
    assert staged_records(run.staging) == clean.staged
    loaded = stages.load(run.discovered, [retry], db_url=url, dag_id=DAG_ID)
    assert {k: loaded[k] for k in clean.loaded} == clean.loaded
    assert result_rows(url) == clean.rows


WRITE_BYTES = 16 << 20
WRITER = r"""
import sys
from pathlib import Path
from image_etl.atomic_files import atomic_write
data = b"x" * int(sys.argv[2])
stop = Path(sys.argv[3]) if len(sys.argv) > 3 else None
while stop is None or not stop.exists():
    atomic_write(Path(sys.argv[1]), data)
"""


def atomic_write_loop(target: Path, workdir: Path, stop: Path | None = None) -> subprocess.Popen:
    """A process rewriting ``target`` (16 MB) with atomic_write until ``stop`` exists."""
    args = [sys.executable, "-c", WRITER, str(target), str(WRITE_BYTES)]
    with open(workdir / "writer.log", "ab") as log:
        return subprocess.Popen(args + ([str(stop)] if stop else []), cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)


def pause_inside_atomic_write(target: Path, workdir: Path, stop: Path | None = None
                              ) -> tuple[subprocess.Popen, str]:
    """An atomic_write loop on ``target``, SIGSTOPped while its temp file is there (between
    open and rename); the process and the temp file's name."""
    writer = atomic_write_loop(target, workdir, stop)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and writer.poll() is None:
        found = [n for n in os.listdir(target.parent)
                 if is_temp(n) and f".{writer.pid}." in n and n.startswith(f".{target.name}.")]
        if found:
            writer.send_signal(signal.SIGSTOP)
            time.sleep(0.05)  # let the stop land, then make sure it landed before the rename
            if (target.parent / found[0]).exists():
                return writer, found[0]
            writer.send_signal(signal.SIGCONT)
        time.sleep(POLL_S)
    writer.kill()
    raise AssertionError(f"no atomic_write caught in the act:\n{(workdir / 'writer.log').read_text()}")


@dataclasses.dataclass
class LoadCase:
    """A previous complete load (the clean run), then a big load of the same drop and model:
    the clean run's 24 real records and 800 renamed copies of them, in the worker's format."""

    previous: Run
    previous_result: dict[str, Any]
    discovered: dict[str, Any]
    results: list[dict[str, Any]]

    def job(self, url: str) -> dict[str, Any]:
        return {"stage": "load", "discovered": self.discovered, "results": self.results,
                "db_url": url, "dag_id": DAG_ID}


def load_case(clean: Clean, workdir: Path) -> LoadCase:
    header, records = read_staging(clean.run.staging)
    assert header is not None
    meta = {k: v for k, v in header.items() if k not in ("kind", "version", "fingerprint")}
    big = workdir / "bulk.staged.jsonl"
    writer = StagingWriter(big, header["fingerprint"], meta)
    writer.resume()
    try:
        for record in records:
            writer.append(record)
        for j in range(BULK_COPIES):
            for record in records:
                writer.append({**record, "rel_path": f"bulk-{j:04d}/{record['rel_path']}"})
    finally:
        writer.close()
    # The bulk copies are listed in the run's manifest too: load refuses staged images that
    # discover did not list (complete loads).
    manifest = json.loads(Path(clean.run.discovered["manifest"]).read_text())
    originals = list(manifest["images"])
    manifest["images"] = originals + [
        [f"bulk-{j:04d}/{entry[0]}", *entry[1:]] for j in range(BULK_COPIES) for entry in originals]
    big_manifest = workdir / "bulk.manifest.json"
    big_manifest.write_text(json.dumps(manifest))
    discovered = {**clean.run.discovered, "run_id": "manual__big_reload",
                  "manifest": str(big_manifest)}
    return LoadCase(clean.run, clean.infer, discovered, [{**clean.infer, "staging": str(big)}])


def load_previous(case: LoadCase, url: str) -> dict[str, Any]:
    stages.load(case.previous.discovered, [case.previous_result], db_url=url, dag_id=DAG_ID)
    return db_state(url)


def reference_state(case: LoadCase, url: str) -> dict[str, Any]:
    """The previous load then the big one, uninterrupted, in a clean schema or database."""
    load_previous(case, url)
    stages.load(case.discovered, case.results, db_url=url, dag_id=DAG_ID)
    return db_state(url)


@dataclasses.dataclass(frozen=True)
class TxPoint:
    """Act on the load when its session, inside a transaction, is in one of ``states`` with
    ``statement`` (a prefix) as its current or last statement; ``delay`` seconds later.
    ("idle in transaction" after "INSERT INTO models": the load reads the staging files.)"""

    aim: str
    statement: str
    states: tuple[str, ...] = ("active",)
    delay: float = 0.0

    def matches(self, row: tuple[int, bool, str, str]) -> bool:
        _, in_tx, state, query = row
        return in_tx and state in self.states and query.startswith(self.statement)


def watch_load(stage: Stage, admin: Any, database: str, point: TxPoint,
               on_hit: Callable[[], Any]) -> str:
    """Poll the load's session; at ``point`` call ``on_hit`` (kill, restart...); say what the
    session was doing at that moment."""
    fire_at: float | None = None
    while stage.running():
        rows = backends(admin, database)
        if fire_at is None and any(point.matches(r) for r in rows):
            fire_at = time.monotonic() + point.delay
        if fire_at is not None and time.monotonic() >= fire_at:
            on_hit()
            return "; ".join(f"{'in a transaction, ' if r[1] else ''}{r[2]}: {r[3][:34]!r}"
                             for r in rows) or "no session"
        time.sleep(POLL_S)
    raise AssertionError(f"the load ended before {point.aim}:\n{stage.output()[-3000:]}")

