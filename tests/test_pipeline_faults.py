"""The stop protocol: a fault in any stage reaches the caller, promptly, with every thread joined
and no partial output left behind.

Faults are bugs, not bad images (those become failed rows, tests/test_bad_input.py): an
exception from the decoder library on the first or a later image, from the forward pass, from
NMS, from the txt writer's rename, from the staging file's append, from the sink's ``open``,
and KeyboardInterrupt / SystemExit in the main thread. Every run happens under an alarm, so a
hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from image_etl import pipeline
from image_etl.output_paths import OutputLayout
from image_etl.settings import InferSettings
from image_etl.staging import StagingWriter
from image_etl.worker import run_shard

from .conftest import DROP_DATE
from .helpers import tasks_for

HANG_S = 60  # far beyond any of these runs: reaching it means the pipeline hung
STAGE_THREADS = ("decode", "writer")


class Injected(RuntimeError):
    pass


@contextlib.contextmanager
def alarm(seconds: int = HANG_S) -> Iterator[None]:
    def hung(signum, frame):
        raise TimeoutError(f"run_shard did not return within {seconds}s: the pipeline hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class Fault:
    """Wraps ``fn``: the ``at``-th call (1-based) raises ``error`` and records when."""

    def __init__(self, fn: Callable, at: int, error: BaseException) -> None:
        self.fn, self.at, self.error = fn, at, error
        self.calls = 0
        self.fired_at: float | None = None
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self._lock:
            self.calls += 1
            fire = self.calls == self.at
        if fire:
            self.fired_at = time.perf_counter()
            raise self.error
        return self.fn(*args, **kwargs)


def with_infer(model: Any, infer: Callable) -> Any:
    """``model`` with its backend's forward pass replaced by ``infer`` (on a copy)."""
    backend = copy.copy(model.backend)
    backend.infer = infer
    return dataclasses.replace(model, backend=backend)


def stage_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(STAGE_THREADS)]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*") if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def reference(small_drop, cpu_model, tmp_path_factory) -> dict[str, bytes]:
    """The txt files of a clean run, with the settings every fault run uses."""
    out = tmp_path_factory.mktemp("reference")
    run_shard(tasks_for(small_drop / DROP_DATE.isoformat()), cpu_model, SETTINGS, OutputLayout(out))
    return {p.name: p.read_bytes() for p in (out / "labels").glob("*.txt")}


SETTINGS = InferSettings(batch_size=2, decode_workers=2, write_queue_size=2)
TIMINGS: dict[str, float] = {}  # fault → seconds from the fault to the caller's exception


def run_with_fault(name: str, fault: Fault, small_drop: Path, model, tmp_path: Path,
                   reference: dict[str, bytes], error_type: type[BaseException],
                   settings: InferSettings = SETTINGS) -> BaseException:
    tasks = tasks_for(small_drop / DROP_DATE.isoformat()) * 2  # 16 images, 8 batches
    out = tmp_path / "out"
    staging = tmp_path / "staging.jsonl"
    with alarm(), pytest.raises(error_type) as info:
        run_shard(tasks, model, settings, OutputLayout(out), staging_path=staging)
    raised_at = time.perf_counter()
    assert fault.fired_at is not None, f"{name}: the fault never fired"
    # The fault itself, or (output errors) the one-line error naming the file, caused by it.
    assert fault.error in (info.value, info.value.__cause__), \
        f"{name}: the caller got {info.value!r}, not the fault"
    TIMINGS[name] = raised_at - fault.fired_at
    print(f"\n{name}: raised {TIMINGS[name]:.3f}s after the fault")
    assert stage_threads() == [], f"{name}: threads left running"
    assert leftovers(out) == [], f"{name}: temp files left"
    # Whatever txt exists is a whole one: the clean run's bytes.
    for txt in (out / "labels").glob("*.txt") if (out / "labels").exists() else []:
        assert txt.read_bytes() == reference[txt.name], f"{name}: {txt.name} differs"
    return info.value


@pytest.mark.parametrize("at", [1, 6], ids=["first-image", "sixth-image"])
def test_decoder_error(at, small_drop, cpu_model, tmp_path, monkeypatch, reference):
    import simplejpeg

    fault = Fault(simplejpeg.decode_jpeg, at, Injected(f"decoder bug on call {at}"))
    monkeypatch.setattr(simplejpeg, "decode_jpeg", fault)
    run_with_fault(f"decoder, image {at}", fault, small_drop, cpu_model, tmp_path, reference,
                   Injected)


def test_forward_pass_error(small_drop, cpu_model, tmp_path, reference):
    fault = Fault(cpu_model.backend.infer, 3, Injected("forward pass bug"))
    model = with_infer(cpu_model, fault)
    run_with_fault("forward pass", fault, small_drop, model, tmp_path, reference, Injected)


def test_nms_error(small_drop, cpu_model, tmp_path, monkeypatch, reference):
    from ultralytics.utils import nms

    fault = Fault(nms.non_max_suppression, 2, Injected("NMS bug"))
    monkeypatch.setattr(nms, "non_max_suppression", fault)
    run_with_fault("NMS", fault, small_drop, cpu_model, tmp_path, reference, Injected)


def test_txt_writer_error(small_drop, cpu_model, tmp_path, monkeypatch, reference):
    """The rename of the 4th txt fails: its temp file must not stay."""
    import os

    from image_etl import atomic_files

    real = os.replace
    txt_renames = Fault(real, 4, OSError(28, "No space left on device (injected)"))

    def replace(src, dst):
        return (txt_renames if str(dst).endswith(".txt") else real)(src, dst)

    monkeypatch.setattr(atomic_files.os, "replace", replace)
    error = run_with_fault("txt writer", txt_renames, small_drop, cpu_model, tmp_path, reference,
                           OSError)
    assert "No space left" in str(error)


@pytest.mark.parametrize("annotated", [False, True], ids=["one-writer", "annotating-writers"])
def test_staging_writer_error(annotated, small_drop, cpu_model, tmp_path, monkeypatch, reference):
    fault = Fault(StagingWriter.append, 3, OSError(5, "Input/output error (injected)"))
    monkeypatch.setattr(StagingWriter, "append", lambda self, rec: fault(self, rec))
    settings = dataclasses.replace(SETTINGS, save_annotated=annotated)
    run_with_fault(f"staging writer ({'annotating' if annotated else 'one writer'})", fault,
                   small_drop, cpu_model, tmp_path, reference, OSError, settings)


def test_sink_open_error(small_drop, cpu_model, tmp_path, monkeypatch, reference):
    fault = Fault(StagingWriter.resume, 1, PermissionError(13, "Permission denied (injected)"))
    monkeypatch.setattr(StagingWriter, "resume", lambda self: fault(self))
    run_with_fault("sink open", fault, small_drop, cpu_model, tmp_path, reference, PermissionError)


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit], ids=lambda e: e.__name__)
def test_interrupt_in_the_main_thread_stops_the_workers(error, small_drop, cpu_model, tmp_path,
                                                        reference):
    fault = Fault(cpu_model.backend.infer, 2, error())
    model = with_infer(cpu_model, fault)
    run_with_fault(error.__name__, fault, small_drop, model, tmp_path, reference, error)


def test_retry_after_a_fault_completes_with_the_clean_outputs(small_drop, cpu_model, tmp_path,
                                                              monkeypatch, reference):
    import simplejpeg

    fault = Fault(simplejpeg.decode_jpeg, 5, Injected("decoder bug"))
    monkeypatch.setattr(simplejpeg, "decode_jpeg", fault)
    tasks = tasks_for(small_drop / DROP_DATE.isoformat())
    out, staging = tmp_path / "out", tmp_path / "staging.jsonl"
    with alarm(), pytest.raises(Injected):
        run_shard(tasks, cpu_model, SETTINGS, OutputLayout(out), staging_path=staging)
    monkeypatch.undo()
    with alarm():
        report = run_shard(tasks, cpu_model, SETTINGS, OutputLayout(out), staging_path=staging)
    assert report.resumed + report.processed == len(tasks) and report.failed == 0
    assert {p.name: p.read_bytes() for p in (out / "labels").glob("*.txt")} == reference


# --- the two stages on their own ------------------------------------------------------------

def test_ordered_map_keeps_order_bounds_the_window_and_raises_at_the_item():
    started: list[int] = []
    consumed: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.001 * (7 - i % 7))  # later items often finish first
        if i == 40:
            raise Injected("item 40")
        return i * i

    with alarm(), pytest.raises(Injected, match="item 40"):
        with pipeline.ordered_map(work, range(100), threads=4, window=5, name="decode") as results:
            for value in results:
                consumed.append(value)
                assert max(started) < len(consumed) + 5  # never more than the window ahead
    assert consumed == [i * i for i in range(40)]
    assert max(started) < 46 and stage_threads() == []


def test_writers_bound_the_queue_and_raise_a_job_error_in_put():
    gate = threading.Event()
    done: list[int] = []

    def job(i: int) -> None:
        gate.wait(5)
        if i == 3:
            raise Injected("job 3")
        done.append(i)

    with alarm(), pytest.raises(Injected, match="job 3"):
        with pipeline.Writers(job, count=1, capacity=2) as writers:
            writers.put(0)
            writers.put(1)
            blocked = threading.Timer(0.3, gate.set)  # put(2) must wait for a free slot
            t0 = time.perf_counter()  # before the timer starts: a late t0 would shorten the wait
            blocked.start()
            writers.put(2)
            assert time.perf_counter() - t0 >= 0.25
            blocked.join()
            for i in range(3, 50):
                writers.put(i)
    assert done == [0, 1, 2] and stage_threads() == []


def test_an_abort_check_ends_a_wait_on_a_slow_stage():
    """The main thread waits for a slow decode; the writer has failed meanwhile: it stops now."""
    release = threading.Event()

    def slow(i: int) -> int:
        release.wait(10)
        return i

    def writer_failed() -> None:
        release.set()  # the decode under way finishes (decodes are bounded); nothing waits on it
        raise Injected("the writer failed")

    t0 = time.perf_counter()
    with alarm(), pytest.raises(Injected, match="writer failed"):
        with pipeline.ordered_map(slow, range(3), threads=1, window=2, name="decode",
                                  abort=writer_failed) as results:
            next(results)
    assert time.perf_counter() - t0 < 5 and stage_threads() == []


# --- bounded shutdown: a stage stuck in I/O is named, not waited for forever ------------------------

@pytest.mark.parametrize("leaving", ["normally", "on-an-error"])
def test_a_writer_stuck_in_io_makes_the_join_raise_naming_it(leaving):
    """Old code: ``__exit__`` joined the writer thread without a bound (the alarm fires)."""
    release = threading.Event()
    try:
        t0 = time.perf_counter()
        with alarm(20), pytest.raises(pipeline.StageStuckError) as info:
            with pipeline.Writers(lambda item: release.wait(30), count=1, capacity=2,
                                  name="writer", join_timeout_s=0.5) as writers:
                writers.put("stuck")
                if leaving == "on-an-error":
                    raise Injected("another stage failed")
        assert 0.5 <= time.perf_counter() - t0 < 5
        assert str(info.value).startswith("writer stage stuck: 1 job(s) still running after "
                                          "0.5 s")
        if leaving == "on-an-error":  # the original error stays attached
            assert isinstance(info.value.__cause__, Injected)
    finally:
        release.set()


def test_a_decode_stuck_in_io_makes_the_join_raise_naming_it():
    release = threading.Event()

    def decode(i: int) -> int:
        if i == 1:
            release.wait(30)  # a read from a hung mount
        return i

    try:
        with alarm(20), pytest.raises(pipeline.StageStuckError, match=r"^decode stage stuck"):
            with pipeline.ordered_map(decode, range(5), threads=2, window=2, name="decode",
                                      join_timeout_s=0.5) as results:
                assert next(results) == 0
                raise Injected("the consumer stops here, item 1 still decoding")
    finally:
        release.set()


# --- GPU out of memory: the retry runs with the failed batch's tensors freed -----------------------

def test_an_out_of_memory_retry_runs_after_the_failed_batch_is_released(small_drop, cpu_model,
                                                                        tmp_path, monkeypatch):
    """The first forward pass makes a tensor (the batch on the device) and raises an
    out-of-memory error, as CUDA would. When the smaller batches run, that tensor must be gone:
    otherwise ``empty_cache()`` freed nothing and the halving cascades. Old code retried inside
    the ``except`` block, whose traceback still held the failed forward's frame and tensor."""
    import gc
    import weakref

    import torch

    from image_etl.worker import _Shard

    real_forward = _Shard._forward
    failed: list[weakref.ref] = []
    alive_at_retry: list[bool] = []

    def forward(self, batch):
        if not failed:
            on_device = torch.ones(len(batch), 3, 64, 64)  # the batch's tensor, in this frame
            failed.append(weakref.ref(on_device))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        alive_at_retry.append(failed[0]() is not None)
        return real_forward(self, batch)

    monkeypatch.setattr(_Shard, "_forward", forward)
    gc.disable()  # released by reference counting, at once, not by a later collection
    try:
        with alarm():
            report = run_shard(tasks_for(small_drop / DROP_DATE.isoformat()), cpu_model,
                               InferSettings(batch_size=4), OutputLayout(tmp_path))
    finally:
        gc.enable()
    assert report.batch_size == 2 and report.ok == 8
    assert alive_at_retry and not any(alive_at_retry), \
        "the failed batch's tensor was still referenced when the smaller batches ran"
