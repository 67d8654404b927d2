"""The stall watchdog: a pipeline stage that makes no progress ends its process, naming the stage.

The real case is a forward pass blocked in native code, which no exception and no Python signal
handler (Airflow's execution_timeout, its SIGTERM) can reach. The end-to-end tests make it
happen in a real run, in a subprocess (the engine's CLI, and dag.test() of the DAG): a
``sitecustomize`` on the child's path replaces the worker's forward step with a ctypes call that
never returns (a default pthread mutex locked twice by the same thread: a deadlock in libc).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from image_etl.output_paths import OutputLayout
from image_etl.pipeline import StageStuckError
from image_etl.settings import InferSettings
from image_etl.watchdog import STALL_EXIT_STATUS, Watchdog, stall_limit_s
from image_etl.worker import ResultSink, run_shard

from .conftest import DEMO_MODEL, DROP_DATE, ROOT
from .helpers import tasks_for

NATIVE_HANG = textwrap.dedent('''
    """Test injection: the worker's forward step blocks in native code, forever."""
    import ctypes
    import os

    if os.environ.get("IMAGE_ETL_TEST_NATIVE_HANG") == "forward":
        import image_etl.worker as worker

        def _forward(self, batch):
            libc = ctypes.CDLL(None)
            mutex = ctypes.create_string_buffer(64)  # zeroed: PTHREAD_MUTEX_INITIALIZER
            libc.pthread_mutex_lock(mutex)
            print("native hang: forward step blocked", flush=True)
            libc.pthread_mutex_lock(mutex)  # a default mutex locked again: never returns
            raise AssertionError("unreachable")

        worker._Shard._forward = _forward
''')
PER_IMAGE_S = 1.0
BATCH = 2
LIMIT_S = stall_limit_s(PER_IMAGE_S, BATCH)  # 8 s


def _hang_env(tmp_path: Path) -> dict[str, str]:
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(NATIVE_HANG)
    path = os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "IMAGE_ETL_TEST_NATIVE_HANG": "forward",
            "YOLO_OFFLINE": "1"}


def _assert_stall_exit(proc: subprocess.CompletedProcess, wall_s: float) -> None:
    output = proc.stdout + proc.stderr
    assert "native hang: forward step blocked" in output, output[-3000:]
    assert proc.returncode == STALL_EXIT_STATUS, output[-3000:]
    found = re.search(r"stalled in stage 'forward \(a batch of \d+ model input\(s\) on cpu, "
                      r"runtime torch\)': no progress for ([\d.]+) s", output)
    assert found, output[-3000:]
    # Ended past the bound, not much later (the message rounds to 0.1 s: 8.04 s shows "8.0").
    assert LIMIT_S <= float(found[1]) < LIMIT_S + 3
    print(f"exit {proc.returncode} after {wall_s:.1f}s: {found[0]}")


def test_a_forward_step_blocked_in_native_code_ends_the_cli_process(small_drop, tmp_path):
    """Old code: the process never ends (killed here by the subprocess timeout)."""
    cmd = [sys.executable, "-m", "image_etl", "infer", str(small_drop / DROP_DATE.isoformat()),
           "--model", str(DEMO_MODEL), "--device", "cpu", "--runtime", "torch",
           "--batch", str(BATCH), "--out", str(tmp_path / "out")]
    env = {**_hang_env(tmp_path), "IMAGE_ETL_TIMEOUT_PER_IMAGE_S": str(PER_IMAGE_S)}
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    _assert_stall_exit(proc, time.monotonic() - start)


DAG_TEST = textwrap.dedent('''
    import datetime as dt, json, sys
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=sys.argv[1])
    assert bag.import_errors == {}, bag.import_errors
    day = dt.date.fromisoformat(sys.argv[2])
    bag.get_dag("nightly_detections").test(
        logical_date=dt.datetime(day.year, day.month, day.day, 2, tzinfo=dt.UTC),
        run_conf=json.loads(sys.argv[3]))
    print("dag.test returned")
''')


@pytest.mark.slow
def test_a_forward_step_blocked_in_native_code_ends_the_airflow_task(airflow_home, small_drop,
                                                                     tmp_path):
    """The same through dag.test() (the tasks run in its process): the infer task's process
    ends with the stall status, the watchdog's limit taken from the run's timeout_per_image_s."""
    conf = {"drop_dir": str(small_drop / "{date}"), "output_dir": str(tmp_path / "out"),
            "devices": "cpu", "settle_seconds": 0, "batch_size": BATCH, "runtime": "torch",
            "timeout_per_image_s": PER_IMAGE_S, "model_path": str(DEMO_MODEL)}
    script = tmp_path / "dag_test.py"
    script.write_text(DAG_TEST)
    env = {**_hang_env(tmp_path), "IMAGE_ETL_DB_URL": f"sqlite:///{tmp_path / 'results.db'}"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), str(ROOT / "dags"),
                           DROP_DATE.isoformat(), json.dumps(conf)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=420)
    assert "dag.test returned" not in proc.stdout
    _assert_stall_exit(proc, time.monotonic() - start)


# --- the watchdog alone, and the pipeline's bounded shutdown ---------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.messages: list[str] = []
        self.fired = threading.Event()

    def __call__(self, message: str) -> None:
        self.messages.append(message)
        self.fired.set()


def test_the_watchdog_fires_on_a_stage_that_lasts_and_not_while_stages_progress():
    recorder = Recorder()
    with Watchdog(2.0, on_stall=recorder) as watchdog:
        for k in range(10):  # 1 s of progress, each stage far shorter than the limit
            watchdog.mark(f"step {k}")
            time.sleep(0.1)
        assert recorder.messages == []
        watchdog.mark("forward")
        assert recorder.fired.wait(10)
    assert recorder.messages[0].startswith("shard stalled in stage 'forward': no progress for")
    assert f"exit status {STALL_EXIT_STATUS}" in recorder.messages[0]


def test_a_bad_limit_is_refused_naming_it():
    with pytest.raises(ValueError, match="invalid parameter limit_s"):
        Watchdog(0)


class StuckWriterSink(ResultSink):
    """A sink whose ``write`` of the last image blocks (a write stuck in I/O) until released."""

    def __init__(self, stuck_on: str) -> None:
        self.stuck_on = stuck_on
        self.release = threading.Event()
        self.written: list[str] = []

    def write(self, item, dets) -> None:
        if item.rel_path == self.stuck_on:
            self.release.wait(60)
        self.written.append(item.rel_path)


def test_a_writer_stuck_at_shutdown_is_an_error_naming_it_then_the_process_ends(
        small_drop, cpu_model, tmp_path):
    """Shutdown waits for the writers, but not forever: StageStuckError naming the writer
    stage once no job finished for the limit; the watchdog stays on and ends the process
    (the stuck thread would keep it alive at exit). Old code: the join never returns."""
    tasks = tasks_for(small_drop / DROP_DATE.isoformat())
    sink = StuckWriterSink(tasks[-1].rel_path)
    recorder = Recorder()
    watchdog = Watchdog(3.0, on_stall=recorder)
    start = time.monotonic()
    try:
        with pytest.raises(StageStuckError, match=r"^writer stage stuck: 1 job\(s\) still running"
                           ) as stuck:
            run_shard(tasks, cpu_model, InferSettings(batch_size=4), OutputLayout(tmp_path),
                      sink=sink, watchdog=watchdog)
        # The join gives up before the watchdog would fire on the shutdown mark, so the error
        # (not the watchdog's "stalled in stage 'shutdown'") is what names the writer.
        waited_s = float(re.search(r"still running after ([0-9.]+) s", str(stuck.value))[1])
        assert waited_s < watchdog.limit_s
        assert time.monotonic() - start < 30
        assert len(sink.written) == len(tasks) - 1
        assert recorder.fired.wait(10), "the watchdog let a process with a stuck thread live on"
        assert "stalled in stage 'exit (after the error: writer stage stuck" in recorder.messages[0]
    finally:
        sink.release.set()
