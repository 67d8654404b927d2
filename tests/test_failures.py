"""Failure semantics under real conditions: each failure fails the task with one line naming
its cause, leaves no partial or temp file behind, and its retry (after fixing the cause)
completes the work with the outputs of a clean run.

Real conditions, no mocks: corrupt, truncated and placeholder weights; devices this host does
not have; an output folder the worker may not write (file permissions that bind root too),
under a file, or on a read-only file system; a disk that fills up mid-shard (a size-limited
tmpfs in a private mount namespace); a database port nobody listens on; a drop where most
images are unreadable. Every stage is called as the DAG's tasks call it (or through the CLI).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from image_etl import stages, synth
from image_etl.atomic_files import OutputWriteError
from image_etl.devices import DeviceError, cuda_device_count
from image_etl.model import ModelLoadError
from image_etl.settings import SettingsError
from image_etl.staging import read_staging
from image_etl.store import StoreError

from .conftest import DEMO_MODEL, ROOT
from .dbrows import result_rows
from .pg import (
    pg_url,  # noqa: F401  (session fixture: a fresh PostgreSQL database)
    schema_url,
)

DAY = dt.date(2026, 3, 7)  # a date of its own: these rows never meet other tests' rows
N_IMAGES = 6
RUN_ID = "manual__failures"
DAG_ID = "nightly_detections"
PASSWORD = "s3cret-pw"


# --- helpers ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def drop(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("failures_drop")
    synth.make_drop(root, DAY, N_IMAGES, width=512, height=3000, seed=3071)
    return root


def stage_params(drop_root: Path, out: Path, **extra) -> dict:
    return {"drop_dir": str(drop_root / "{date}"), "output_dir": str(out),
            "model_path": str(DEMO_MODEL), "devices": "cpu", "settle_seconds": 0,
            "batch_size": 2, **extra}


def run_stages(params: dict, db_url: str | None = None) -> tuple[dict, list[dict]]:
    """discover → partition → infer, as the DAG's tasks call them."""
    discovered = stages.discover(params, run_id=RUN_ID, run_date=DAY, db_url=db_url)
    return discovered, [stages.infer(shard) for shard in stages.partition(discovered)]


def outputs(out: Path) -> dict[str, bytes]:
    """Every output file (txt labels, annotated images), the run's own files excluded."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] != "_runs"}


def leftovers(out: Path) -> list[str]:
    """Temp files of interrupted writes (``.<name>.<pid>.<thread>.tmp``)."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                  if p.name.endswith(".tmp") or p.name.startswith("."))


def staged_records(results: list[dict]) -> dict[str, dict]:
    return {r["rel_path"]: r for res in results for r in read_staging(Path(res["staging"]))[1]}


def assert_one_line(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message, message


@pytest.fixture(scope="module")
def reference(drop, tmp_path_factory) -> dict:
    """A clean run's outputs: what every retry must end with."""
    out = tmp_path_factory.mktemp("reference") / "out"
    _, results = run_stages(stage_params(drop, out))
    labels = outputs(out)
    assert len(labels) == N_IMAGES and any(labels.values())  # real detections to compare
    return {"labels": labels, "staged": staged_records(results)}


# --- the model cannot load ---------------------------------------------------------------------

def _lfs_pointer() -> bytes:
    return (b"version https://git-lfs.github.com/spec/v1\n"
            b"oid sha256:0e6e6d1c1b6c8a4c1c0e5a1d5d2f3c5d6b0e0f4e3d2c1b0a9f8e7d6c5b4a3f2e\n"
            b"size 5424922\n")


WEIGHTS = {
    # kind: (how the file is spoiled, what the message must say)
    "missing": (None, "no such file"),
    "empty": (lambda: b"", "the file is empty"),
    "random-bytes": (lambda: b"\x13" + np.random.default_rng(5).bytes(4095),
                     "neither a zip archive nor a pickle"),
    "git-lfs-pointer": (_lfs_pointer, "Git LFS pointer"),
    "truncated-copy": (lambda: DEMO_MODEL.read_bytes()[:DEMO_MODEL.stat().st_size // 2],
                       "truncated"),
}


@pytest.mark.parametrize("kind", list(WEIGHTS))
def test_unusable_weights_are_refused_in_discover(kind, drop, tmp_path):
    spoil, expected = WEIGHTS[kind]
    model, out = tmp_path / "model.pt", tmp_path / "out"
    if spoil is not None:
        model.write_bytes(spoil())
    with pytest.raises((SettingsError, ModelLoadError)) as info:
        stages.discover(stage_params(drop, out, model_path=str(model)), run_id=RUN_ID,
                        run_date=DAY, db_url=None)
    message = str(info.value)
    assert_one_line(message)
    assert str(model) in message and expected in message, message
    assert not out.exists(), "nothing is written before the weights are known to be usable"
    # Fixed (the real weights put in place), the same params go through.
    shutil.copyfile(DEMO_MODEL, model)
    discovered = stages.discover(stage_params(drop, out, model_path=str(model)), run_id=RUN_ID,
                                 run_date=DAY, db_url=None)
    assert discovered["images"] == N_IMAGES


def test_weights_that_are_no_ultralytics_model_fail_in_infer_naming_the_file(drop, tmp_path,
                                                                             reference):
    import torch

    model, out = tmp_path / "model.pt", tmp_path / "out"
    # A well-formed PyTorch checkpoint (passes discover's torch-free check): a bare state_dict.
    torch.save(torch.nn.Linear(2, 2).state_dict(), model)
    params = stage_params(drop, out, model_path=str(model))
    discovered = stages.discover(params, run_id=RUN_ID, run_date=DAY, db_url=None)
    [shard] = stages.partition(discovered)
    with pytest.raises(ModelLoadError) as info:
        stages.infer(shard)
    message = str(info.value)
    assert_one_line(message)
    assert message.startswith(f"cannot load model weights {model}: ") and "Ultralytics" in message
    assert info.value.__cause__ is not None  # the library's own error, chained
    assert not (out / "labels").exists() and leftovers(out) == []
    assert not list((out / "_runs").rglob("*.staged.jsonl"))
    # Swapping the weights under a running DAG run would mix two models' results into rows
    # keyed by the first one's sha256: refused, naming the way out.
    shutil.copyfile(DEMO_MODEL, model)
    with pytest.raises(ModelLoadError, match="changed since discover.*from discover") as info:
        stages.infer(shard)
    assert_one_line(str(info.value))
    # The retry that works: the run again from discover, with the fixed weights.
    _, results = run_stages(params)
    assert outputs(out) == reference["labels"]
    assert staged_records(results) == reference["staged"]


def test_cli_with_corrupt_weights_says_so_in_one_line(drop, tmp_path):
    model, out = tmp_path / "model.pt", tmp_path / "out"
    model.write_bytes(DEMO_MODEL.read_bytes()[:100_000])  # an interrupted copy
    proc = subprocess.run(
        [sys.executable, "-m", "image_etl", "infer", str(drop / DAY.isoformat()), "--out",
         str(out), "--model", str(model)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: model weights {model} are not a PyTorch checkpoint"), last
    assert "truncated" in last
    assert not out.exists()


# --- devices --------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["gpu7", "cuda:{n}", "{n}", "cuda:99", "cpu,cuda:{n}"])
def test_device_this_fleet_lacks_is_refused_in_discover(spec, drop, tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGE_ETL_GPUS", raising=False)  # the fleet's GPUs = this host's
    n = cuda_device_count()
    spec = spec.format(n=n)
    out = tmp_path / "out"
    with pytest.raises(SettingsError) as info:
        stages.discover(stage_params(drop, out, devices=spec), run_id=RUN_ID, run_date=DAY,
                        db_url=None)
    message = str(info.value)
    assert_one_line(message)
    bad = spec.split(",")[-1]
    assert message.startswith("invalid parameter devices: ") and repr(bad) in message, message
    if bad == "gpu7":
        assert "is not valid" in message and "'cpu'" in message  # and what would be valid
    else:
        assert f"does not exist on this host ({n} GPU(s) visible)" in message
    assert not out.exists()
    # Fixed param: the run goes on.
    fixed = stages.discover(stage_params(drop, out, devices="cpu"), run_id=RUN_ID, run_date=DAY,
                            db_url=None)
    assert fixed["images"] == N_IMAGES


@pytest.mark.parametrize("spec", ["{n}", "auto"])
def test_shard_on_a_worker_without_its_gpu_fails_naming_the_device(spec, drop, tmp_path,
                                                                  monkeypatch):
    """The scheduler believes the workers have one GPU more than this one has: a worker that
    lost its GPU (driver gone, card pulled, CUDA_VISIBLE_DEVICES changed)."""
    n = cuda_device_count()
    if spec == "auto" and n:
        pytest.skip("this host has a GPU: an 'auto' shard (any free GPU) can run here")
    monkeypatch.setenv("IMAGE_ETL_GPUS", str(n + 1))
    out = tmp_path / "out"
    discovered = stages.discover(stage_params(drop, out, devices=spec.format(n=n)), run_id=RUN_ID,
                                 run_date=DAY, db_url=None)
    shard = stages.partition(discovered)[-1]
    assert shard["device"] in {f"cuda:{n}", "cuda"}
    with pytest.raises(DeviceError) as info:
        stages.infer(shard)
    message = str(info.value)
    assert_one_line(message)
    assert f"shard device {shard['device']!r} is not available on host" in message, message
    assert (f"{n} CUDA GPU(s) visible" if n else "no usable CUDA GPU") in message, message
    assert not (out / "labels").exists()
    assert not list((out / "_runs").rglob("*.staged.jsonl"))
    # (Its retry runs on whichever worker of the 'gpu' queue has the device: not this host.)


# --- output folder not writable -------------------------------------------------------------------

def test_output_dir_under_a_file_is_refused_and_the_retry_completes(drop, tmp_path, reference):
    blocker = tmp_path / "outputs"
    blocker.write_text("a file where the output folder's parent should be\n")
    out = blocker / "2026-03-07"
    params = stage_params(drop, out)
    with pytest.raises(OutputWriteError) as info:
        stages.discover(params, run_id=RUN_ID, run_date=DAY, db_url=None)
    message = str(info.value)
    assert_one_line(message)
    assert message.startswith(f"cannot write {out}/") and "Not a directory" in message, message
    assert f"({blocker} is a file, not a folder)" in message, message
    assert isinstance(info.value, OSError) and isinstance(info.value.__cause__, OSError)
    blocker.unlink()  # fixed
    _, results = run_stages(params)
    assert outputs(out) == reference["labels"] and leftovers(out) == []
    assert staged_records(results) == reference["staged"]


def _without_root_powers() -> list[str]:
    """A command prefix under which file permissions apply to this process.

    As root: drop the capabilities that let root ignore them (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH) with setpriv(1), so a folder without write permission really refuses
    the worker, like any unprivileged worker user. (Switching to ``nobody`` would not do
    here: the venv's interpreter lives under /root, which nobody may not enter.)
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv(1): cannot make a folder unwritable")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]


def test_cli_output_dir_not_writable_then_fixed(drop, reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)  # nobody may write here, root included once without its override
    cmd = [*_without_root_powers(), sys.executable, "-m", "image_etl", "infer",
           str(drop / DAY.isoformat()), "--out", str(out), "--model", str(DEMO_MODEL),
           "--batch", "2"]
    env = {**os.environ, "YOLO_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {out}/labels/"), last
    assert "Permission denied" in last and f"({out} is not writable by uid " in last, last
    assert list(out.rglob("*")) == []  # no partial txt, no temp file
    out.chmod(0o755)  # fixed: the retry completes
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert outputs(out) == reference["labels"] and leftovers(out) == []


# --- read-only file system, then a full disk, mid-shard ------------------------------------------

# Runs inside a private mount namespace where the output folder is a small tmpfs: discover and
# partition, then infer on the file system remounted read-only, then on disks filled up to
# leave cfg["rounds"] bytes free, then again after the filler is deleted. Writes what each
# attempt saw.
_NAMESPACE_CHILD = r"""
import datetime as dt, json, os, subprocess, sys
from pathlib import Path
from image_etl import stages
from image_etl.staging import read_staging

cfg = json.loads(sys.argv[1])
out = Path(cfg["out"])
seen = {}

def files():
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())

def attempt(name):
    entry = {}
    try:
        entry["result"] = stages.infer(shard)
    except Exception as exc:
        entry.update(type=type(exc).__name__, message=str(exc), errno=getattr(exc, "errno", None),
                     cause=type(exc.__cause__).__name__ if exc.__cause__ else None)
    entry["files"] = files()
    entry["labels"] = {p: (out / p).read_text() for p in entry["files"] if p.startswith("labels/")}
    entry["staged"] = read_staging(staging)[1] if staging.exists() else None
    seen[name] = entry

discovered = stages.discover(cfg["params"], run_id="nospace", run_date=dt.date.fromisoformat(
    cfg["date"]), db_url=None)
[shard] = stages.partition(discovered)
staging = Path(shard["run_dir"]) / f"shard-{shard['index']:03d}.staged.jsonl"
seen["before"] = {"files": files()}
subprocess.run(["mount", "-o", "remount,ro", str(out)], check=True)
attempt("read_only")
subprocess.run(["mount", "-o", "remount,rw", str(out)], check=True)
for name, keep_bytes in cfg["rounds"]:
    free = os.statvfs(out).f_bavail * os.statvfs(out).f_frsize
    with open(out / "filler.bin", "wb") as f:
        f.write(bytes(max(free - keep_bytes, 0)))
    attempt(name)
    (out / "filler.bin").unlink()  # space freed
attempt("retry")
Path(cfg["result"]).write_text(json.dumps(seen))
"""


def _namespace_prefix(mountpoint: Path) -> list[str]:
    """unshare as root, or with a user namespace otherwise; skip only if neither is allowed."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1): cannot make a private mount namespace for a small tmpfs")
    prefix = [unshare, "-m"] if os.geteuid() == 0 else [unshare, "-r", "-m"]
    probe = subprocess.run([*prefix, "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"',
                            str(mountpoint)], capture_output=True, text=True, timeout=60)
    if probe.returncode:
        pytest.skip(f"mounting a tmpfs in a private mount namespace is not permitted here: "
                    f"{probe.stderr.strip()}")
    return prefix


def test_read_only_then_full_disk_mid_shard_then_retry_completes(drop, reference, tmp_path):
    out = tmp_path / "tmpfs"  # the mount point; the tmpfs exists in the namespace only
    out.mkdir()
    prefix = _namespace_prefix(out)
    # No byte left (the first write fails), then four and three 4 KiB pages (a few more
    # images fit each time: the disk fills up mid-shard, at a staged line, then at a txt).
    cfg = {"out": str(out), "date": DAY.isoformat(),
           "rounds": [["disk_full_at_start", 0], ["disk_full", 4 * 4096],
                      ["disk_full_again", 3 * 4096]],
           "result": str(tmp_path / "seen.json"), "params": stage_params(drop, out)}
    proc = subprocess.run(
        [*prefix, "sh", "-c", 'mount -t tmpfs -o size=2m tmpfs "$0" && exec "$1" -c "$2" "$3"',
         str(out), sys.executable, _NAMESPACE_CHILD, json.dumps(cfg)],
        cwd=ROOT, env={**os.environ, "YOLO_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(out.iterdir()) == []  # the tmpfs lived in the namespace only
    seen = json.loads((tmp_path / "seen.json").read_text())
    ref_labels = {k: v.decode() for k, v in reference["labels"].items()}

    # Read-only file system: refused at the first write, nothing written.
    ro = seen["read_only"]
    assert ro["type"] == "OutputWriteError" and ro["cause"] == "OSError", ro
    assert_one_line(ro["message"])
    assert ro["message"].startswith(f"cannot write {out}/_runs/"), ro["message"]
    assert "Read-only file system" in ro["message"]
    assert ro["files"] == seen["before"]["files"]

    # Disk full at the first write (the staging file's header): nothing left behind.
    start = seen["disk_full_at_start"]
    assert start["type"] == "OutputWriteError" and start["errno"] == 28, start
    assert_one_line(start["message"])
    assert start["message"].startswith(f"cannot write {out}/_runs/"), start["message"]
    assert "No space left on device" in start["message"]
    assert start["files"] == sorted([*seen["before"]["files"], "filler.bin"])  # no temp file

    # Disk full mid-shard, twice: the error names the cause and the file; what is on disk is
    # whole; each attempt resumes the last one's finished images.
    failed_at, done = [], 0
    for name in ("disk_full", "disk_full_again"):
        full = seen[name]
        assert full["type"] == "OutputWriteError" and full["errno"] == 28, full
        assert_one_line(full["message"])
        assert full["message"].startswith(f"cannot write {out}/"), full["message"]
        assert full["message"].endswith(": No space left on device"), full["message"]
        failed_at.append(full["message"].split(":")[0].rsplit("/", 1)[-1])
        assert [f for f in full["files"] if f.rsplit("/", 1)[-1].startswith(".")] == []
        staged = {r["rel_path"]: r for r in full["staged"]}
        assert done < len(staged) < N_IMAGES, f"{name}: the disk should fill up mid-shard"
        done = len(staged)
        for rel, text in full["labels"].items():
            assert text == ref_labels[rel], f"partial or wrong {rel}"
        assert {f"labels/{Path(rel).with_suffix('.txt')}" for rel in staged} <= set(full["labels"])
        assert all(staged[rel] == reference["staged"][rel] for rel in staged)
    # Both kinds of write met the full disk (else tune the rounds' free bytes above).
    assert failed_at[0].endswith(".staged.jsonl") and failed_at[1].endswith(".txt"), failed_at

    # Space freed: the retry resumes what was finished and completes the rest.
    retry = seen["retry"]
    assert "result" in retry, retry.get("message")
    assert retry["result"]["resumed"] == done
    assert retry["result"]["processed"] == N_IMAGES - done
    assert retry["labels"] == ref_labels
    assert {r["rel_path"]: r for r in retry["staged"]} == reference["staged"]
    assert [f for f in retry["files"] if f.rsplit("/", 1)[-1].startswith(".")] == []


# --- the results database is unreachable -----------------------------------------------------------

@pytest.fixture()
def pg_schema_url(pg_url) -> Iterator[str]:  # noqa: F811
    """The session's PostgreSQL database, in a schema of this test's own."""
    with schema_url(pg_url) as url:
        yield url


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens once the socket is closed


def assert_clear_db_error(exc: BaseException, port: int) -> None:
    message = str(exc)
    assert isinstance(exc, StoreError), repr(exc)
    assert_one_line(message)
    assert f"postgresql+psycopg2://etl:***@127.0.0.1:{port}/results" in message, message
    assert "Connection refused" in message
    assert exc.__cause__ is not None  # the driver's error, chained
    assert PASSWORD not in "".join(traceback.format_exception(exc))


def test_unreachable_database_names_it_without_the_password_and_the_retry_loads(
        drop, tmp_path, pg_schema_url, caplog):
    caplog.set_level(logging.DEBUG)
    port = _closed_port()
    bad = f"postgresql+psycopg2://etl:{PASSWORD}@127.0.0.1:{port}/results"
    out = tmp_path / "out"
    params = stage_params(drop, out)
    with pytest.raises(StoreError) as info:
        stages.discover(params, run_id=RUN_ID, run_date=DAY, db_url=bad)
    assert_clear_db_error(info.value, port)
    assert not out.exists()

    discovered, results = run_stages(params, db_url=pg_schema_url)  # discover's retry
    staging = {r["staging"]: Path(r["staging"]).read_bytes() for r in results}
    with pytest.raises(StoreError) as info:
        stages.load(discovered, results, db_url=bad, dag_id=DAG_ID)
    assert_clear_db_error(info.value, port)
    assert {p: Path(p).read_bytes() for p in staging} == staging  # kept for the retry

    loaded = stages.load(discovered, results, db_url=pg_schema_url, dag_id=DAG_ID)  # load's retry
    assert loaded["images"] == N_IMAGES and loaded["failed"] == 0
    with pytest.raises(StoreError) as info:
        stages.report(discovered, loaded, db_url=bad)
    assert_clear_db_error(info.value, port)
    assert stages.report(discovered, loaded, db_url=pg_schema_url)["drop"]["images"] == N_IMAGES

    sqlite = f"sqlite:///{tmp_path / 'same.db'}"
    stages.load(discovered, results, db_url=sqlite, dag_id=DAG_ID)
    rows = result_rows(pg_schema_url)
    assert len(rows["images"]) == N_IMAGES and rows["detections"]
    assert rows == result_rows(sqlite)
    assert "loaded" in caplog.text and PASSWORD not in caplog.text  # logs, none with it


# --- most images fail ----------------------------------------------------------------------------

def test_run_where_most_images_fail_is_a_failed_run(drop, tmp_path):
    root = tmp_path / "drop"
    day = root / DAY.isoformat()
    day.mkdir(parents=True)
    good = sorted((drop / DAY.isoformat()).glob("*.jpg"))[0]
    shutil.copyfile(good, day / good.name)
    (day / "text.jpg").write_text("not an image at all")
    (day / "empty.jpg").write_bytes(b"")
    (day / "truncated.jpg").write_bytes(good.read_bytes()[:3000])
    db = f"sqlite:///{tmp_path / 'results.db'}"
    params = stage_params(root, tmp_path / "out", max_failed_fraction=0.5)
    discovered, results = run_stages(params)  # the workers themselves succeed
    assert sum(r["failed"] for r in results) == 3
    loaded = stages.load(discovered, results, db_url=db, dag_id=DAG_ID)
    with pytest.raises(RuntimeError) as info:
        stages.report(discovered, loaded, db_url=db)
    message = str(info.value)
    assert_one_line(message)
    assert re.search(r"\b3 of 4 images\b.* failed\b", message), message
    assert "max_failed_fraction=0.5" in message, message
    # The threshold is a param: 3 of 4 is within 0.75.
    tolerant = stages.discover({**params, "max_failed_fraction": 0.75}, run_id=RUN_ID,
                               run_date=DAY, db_url=None)
    assert stages.report(tolerant, loaded, db_url=db)["drop"]["failed"] == 3
