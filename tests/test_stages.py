"""The stages' own rules, called as the DAG's tasks call them: what the load refuses, what it
needs (no model file), how a run's throughput and labels are made, which run folders go, and
the resources the worker sizes itself by."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from image_etl import resources, stages, synth
from image_etl.errors import MissingStagingError
from image_etl.run_settings import RunSettings

from .conftest import DEMO_MODEL
from .dbrows import result_rows

DAY = dt.date(2026, 4, 9)


@pytest.fixture(scope="module")
def drop(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stages_drop")
    synth.make_drop(root, DAY, 3, width=512, height=3000, seed=409)
    return root


def params(drop: Path, out: Path, model: Path = DEMO_MODEL, **extra) -> dict:
    return {"drop_dir": str(drop / "{date}"), "output_dir": str(out), "model_path": str(model),
            "devices": "cpu,cpu", "settle_seconds": 0, "batch_size": 2, **extra}


def through_infer(params: dict, run_id: str = "manual__stages") -> tuple[dict, list[dict]]:
    discovered = stages.discover(params, run_id=run_id, run_date=DAY, db_url=None)
    return discovered, [stages.infer(shard) for shard in stages.partition(discovered)]


def test_load_and_report_need_no_model_file(drop, tmp_path):
    """The weights may move once inference is done: the load takes the class names from the
    staging header and never looks for the file."""
    model = tmp_path / "weights" / "best.pt"
    model.parent.mkdir()
    shutil.copyfile(DEMO_MODEL, model)
    db = f"sqlite:///{tmp_path / 'results.db'}"
    discovered, results = through_infer(params(drop, tmp_path / "out", model))
    shutil.rmtree(model.parent)
    loaded = stages.load(discovered, results, db_url=db, dag_id="nightly_detections")
    summary = stages.report(discovered, loaded, db_url=db)
    assert loaded["images"] == 3 and summary["run"]["images"] == 3
    assert summary["drop"]["images"] == 3 and summary["drop"]["per_class"]
    assert {r[4] for r in result_rows(db)["detections"]} <= {"spot", "patch"}


def test_a_missing_staging_file_fails_the_load_naming_it_and_its_host(drop, tmp_path):
    db = f"sqlite:///{tmp_path / 'results.db'}"
    discovered, results = through_infer(params(drop, tmp_path / "out"))
    lost = Path(results[1]["staging"])
    lost.unlink()  # a worker on another host, without the shared output folder
    with pytest.raises(MissingStagingError) as info:
        stages.load(discovered, results, db_url=db, dag_id="nightly_detections")
    message = str(info.value)
    assert "1 of 2 shard staging file(s) missing" in message
    assert str(lost) in message and f"written on host {results[1]['host']}" in message
    assert "\n" not in message
    assert not Path(db.removeprefix("sqlite:///")).exists() or result_rows(db)["images"] == []


def test_an_unreadable_staging_file_is_logged_before_the_shard_is_redone(drop, tmp_path, caplog):
    discovered, results = through_infer(params(drop, tmp_path / "out"))
    staging = Path(results[0]["staging"])
    lines = staging.read_text().splitlines(keepends=True)
    staging.write_text(lines[0] + "{not json\n" + "".join(lines[1:]))
    shard = stages.partition(discovered)[0]
    with caplog.at_level(logging.WARNING, logger="image_etl.staging"):
        again = stages.infer(shard)
    assert f"staging file {staging} cannot be read" in caplog.text and "corrupt at line 2" in caplog.text
    assert again["processed"] == shard["images"] and again["resumed"] == 0


def test_model_template_tells_two_weights_of_the_same_name_apart(tmp_path):
    one, other = tmp_path / "a" / "best.pt", tmp_path / "b" / "best.pt"
    for path, extra in ((one, b""), (other, b"\0")):
        path.parent.mkdir()
        path.write_bytes(DEMO_MODEL.read_bytes() + extra)
    out = {RunSettings.from_params({"model_path": str(p), "output_dir": "/out/{model}/{date}",
                                    "drop_dir": "/drops/{date}"}, DAY).output_dir for p in (one, other)}
    assert len(out) == 2 and all(p.parent.name.startswith("best-") for p in out)
    assert all(len(p.parent.name) == len("best-") + 8 and p.name == DAY.isoformat() for p in out)


def test_shard_labels_are_unique_and_read_well():
    shards = [{"index": 0, "shards": 2, "device": "cpu", "images": 3},
              {"index": 1, "shards": 2, "device": "cpu", "images": 1}]
    labels = [stages.shard_label(s) for s in shards]
    assert labels == ["shard 1/2 · cpu · 3 images", "shard 2/2 · cpu · 1 image"]
    assert stages.shard_label({**shards[0], "device": "cuda"}, "cuda:1") == "shard 1/2 · cuda:1 · 3 images"


def test_infer_time_limit_grows_with_the_shard(tmp_path):
    settings = RunSettings.from_params({"model_path": str(DEMO_MODEL), "drop_dir": "/d",
                                        "output_dir": "/o", "timeout_per_image_s": 2}, DAY)
    shard = {"settings": settings.to_dict(), "images": 100}
    assert stages.infer_time_limit_s(shard) == stages.MODEL_LOAD_BUDGET_S + 200


def test_run_throughput_spans_the_shards_as_they_really_ran():
    one_after_the_other = [{"started_at": 100.0, "ended_at": 110.0, "seconds": 10.0},
                           {"started_at": 110.5, "ended_at": 121.0, "seconds": 10.5}]
    side_by_side = [{"started_at": 100.0, "ended_at": 110.0, "seconds": 10.0},
                    {"started_at": 100.2, "ended_at": 109.0, "seconds": 8.8}]
    assert stages._infer_span_s(one_after_the_other) == pytest.approx(21.0)
    assert stages._infer_span_s(side_by_side) == pytest.approx(10.0)
    assert stages._infer_span_s([]) == 0.0


def _run_folder(root: Path, name: str, date: str, age_s: float) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"date": date, "images": []}))
    (folder / "shard-000.staged.jsonl").write_text("{}\n")
    then = time.time() - age_s
    for path in (*folder.iterdir(), folder):
        os.utime(path, (then, then))
    return folder


def test_old_run_folders_are_pruned_per_date_never_the_recent_ones(tmp_path):
    runs = tmp_path / "_runs"
    day = 86_400
    old = [_run_folder(runs, f"old-{k}", "2026-04-01", (10 + k) * day) for k in range(4)]
    other_date = _run_folder(runs, "other-date", "2026-04-02", 30 * day)
    fresh = [_run_folder(runs, f"fresh-{k}", "2026-04-01", 60 * (k + 1)) for k in range(3)]
    current = _run_folder(runs, "current", "2026-04-01", 0)
    pruned = stages.prune_run_dirs(current, keep_per_date=3)
    # For 2026-04-01 the 3 newest are current + 2 fresh; the third fresh one is too recent to
    # go (it may still be retried); every old one goes. The other date keeps its only run.
    assert sorted(p.name for p in pruned) == sorted(p.name for p in old)
    assert all(p.is_dir() for p in (*fresh, current, other_date))
    assert not any(p.exists() for p in old)


@contextlib.contextmanager
def _undeletable(folder: Path):
    """Files in ``folder`` cannot be removed, even by root (immutable), while inside."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        try:
            yield
        finally:
            folder.chmod(0o700)
        return
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True,
                          timeout=30, check=False)
    if made.returncode != 0:
        pytest.skip(f"root here, and chattr +i does not work on {folder}: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True, timeout=30)


def test_a_failed_prune_is_logged_and_never_fails_a_loaded_run(tmp_path, caplog):
    """Pruning is housekeeping after the load: a run folder that cannot be deleted is named
    in the log, the other old folders still go, and the report succeeds."""
    (tmp_path / "drop" / DAY.isoformat()).mkdir(parents=True)  # an empty night: no model run
    out, db = tmp_path / "out", f"sqlite:///{tmp_path / 'results.db'}"
    run_params = params(tmp_path / "drop", out)
    discovered = stages.discover(run_params, run_id="manual__prune", run_date=DAY, db_url=db)
    loaded = stages.load(discovered, [], db_url=db, dag_id="nightly_detections")
    # Kept: this run and the 2 newest old ones (KEEP_RUNS_PER_DATE=3); the 3 oldest go.
    old = [_run_folder(out / "_runs", f"old-{k}", DAY.isoformat(), (10 + k) * 86_400)
           for k in range(5)]
    stuck = old[-1]
    (stuck / "sub").mkdir()
    (stuck / "sub" / "staged.jsonl").write_text("{}\n")
    then = time.time() - 20 * 86_400
    for path in (stuck / "sub", stuck):
        os.utime(path, (then, then))
    with _undeletable(stuck / "sub"), caplog.at_level(logging.WARNING, logger="image_etl.run_folders"):
        summary = stages.report(discovered, loaded, db_url=db)
        assert stuck.is_dir()
    assert summary["run"]["images"] == 0
    assert f"old run folder {stuck} not pruned" in caplog.text
    assert [p.exists() for p in old] == [True, True, False, False, True]


def test_cpu_count_follows_the_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert resources.cgroup_cpu_quota(tmp_path) == 1.5
    assert resources.cpu_count(tmp_path) == min(2, len(os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert resources.cgroup_cpu_quota(tmp_path) is None
    assert resources.cpu_count(tmp_path) == len(os.sched_getaffinity(0))
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert resources.cpu_count(v1) == 1


def test_gpu_count_needs_no_torch(tmp_path):
    proc = tmp_path / "gpus"
    for bus in ("0000:17:00.0", "0000:65:00.0", "0000:ca:00.0"):
        (proc / bus).mkdir(parents=True)
    assert resources.gpu_count({}, proc) in (3, resources._nvml_count())
    if resources._nvml_count() is None:  # no NVIDIA driver here: the /proc entries count
        assert resources.gpu_count({}, proc) == 3
        assert resources.gpu_count({"CUDA_VISIBLE_DEVICES": "1,2"}, proc) == 2
        assert resources.gpu_count({"CUDA_VISIBLE_DEVICES": "2,7,0"}, proc) == 1  # cut at 7
        assert resources.gpu_count({"CUDA_VISIBLE_DEVICES": ""}, proc) == 0
        assert resources.gpu_count({}, tmp_path / "none") == 0
    import subprocess
    import sys

    code = ("import sys; from image_etl import stages, devices; devices.fleet_gpu_count(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "IMAGE_ETL_GPUS"})
    assert out.stdout.strip() == "False", out.stderr
