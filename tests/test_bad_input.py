"""Odd and hostile files through the worker: each is processed or becomes one failed row with
a specific reason; the rest of the shard always goes on."""

from __future__ import annotations

from pathlib import Path

import pytest

from image_etl.output_paths import OutputLayout
from image_etl.settings import InferSettings
from image_etl.staging import read_staging
from image_etl.worker import ImageTask, run_shard

from .helpers import bad_cases


@pytest.fixture(scope="module")
def bad_drop(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_drop")
    for name, (data, _) in bad_cases().items():
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
def test_every_odd_file_is_processed_or_failed_with_its_reason(bad_drop, cpu_model, tmp_path, fast):
    tasks = [ImageTask(bad_drop / name, name) for name in sorted(bad_cases())]
    staging = tmp_path / "stage.jsonl"
    report = run_shard(tasks, cpu_model, InferSettings(fast_decode=fast, batch_size=4),
                       OutputLayout(tmp_path / "out"), staging)
    staged = {r["rel_path"]: r for r in read_staging(staging)[1]}
    assert sorted(staged) == sorted(bad_cases())
    for name, (_, expected) in bad_cases().items():
        record = staged[name]
        txt = tmp_path / "out" / "labels" / Path(name).with_suffix(".txt")
        if expected is None:
            assert record["status"] == "ok", (name, record["error"])
            assert txt.exists(), name
        else:
            assert record["status"] == "failed" and expected in record["error"], (name, record)
            assert not txt.exists(), name
    assert report.failed == sum(1 for _, e in bad_cases().values() if e)
    # Nothing half-written: no temp files anywhere under the outputs.
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]


def test_exif_orientation_is_applied_like_model_predict(bad_drop, cpu_model, demo_model_path, tmp_path):
    """Orientation is applied (as OpenCV and therefore model.predict do): same detections."""
    from ultralytics import YOLO

    name = "exif-rotated.jpg"
    staging = tmp_path / "s.jsonl"
    run_shard([ImageTask(bad_drop / name, name)], cpu_model, InferSettings(),
              OutputLayout(tmp_path), staging)
    record = read_staging(staging)[1][0]
    assert (record["width"], record["height"]) == (3000, 512)  # rotated on display
    r = YOLO(str(demo_model_path)).predict(str(bad_drop / name), verbose=False)[0]
    assert r.orig_shape == (512, 3000)
    assert len(record["detections"]) == len(r.boxes) > 0
    for mine, theirs in zip(sorted(d[2:6] for d in record["detections"]),
                            sorted(r.boxes.xyxy.tolist())):
        assert max(abs(a - b) for a, b in zip(mine, theirs)) <= 1.0


def test_unreadable_file_becomes_a_failed_row(demo_model_path, tmp_path):
    """Permission denied on one file: a failed row with that reason, the rest processed.

    Root reads anything: as root the worker runs without the capabilities that bypass file
    permissions (util-linux ``setpriv``), so the kernel really refuses the read.
    """
    import os
    import shutil
    import subprocess
    import sys

    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    good = bad_cases()["name with spaces 'quotes' \"double\" é漢字.jpg"][0]
    (images / "readable.jpg").write_bytes(good)
    (images / "secret.jpg").write_bytes(good)
    (images / "secret.jpg").chmod(0o000)
    staging = out / "staged.jsonl"
    cmd = [sys.executable, "-m", "image_etl", "infer", str(images), "--out", str(out), "--model",
           str(demo_model_path), "--staging", str(staging)]
    if os.geteuid() == 0:
        assert shutil.which("setpriv"), "setpriv (util-linux) is needed to drop root's DAC override"
        drop = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    staged = {r["rel_path"]: r for r in read_staging(staging)[1]}
    assert staged["readable.jpg"]["status"] == "ok"
    assert staged["secret.jpg"]["status"] == "failed"
    assert staged["secret.jpg"]["error"] == "unreadable: permission denied"
    assert (out / "labels" / "readable.txt").is_file()
    assert not (out / "labels" / "secret.txt").exists()


def test_cli_exit_status_says_when_too_many_images_failed(demo_model_path, tmp_path):
    """The CLI judges failures like the DAG's report: more than --max-failed-fraction failed
    → status 3 naming the reasons; with --staging, on every image done so far (a resumed run
    that has nothing left to do is still judged on the folder)."""
    import subprocess
    import sys

    images, out, staging = tmp_path / "images", tmp_path / "out", tmp_path / "staged.jsonl"
    images.mkdir()
    cases = bad_cases()
    (images / "good.jpg").write_bytes(cases["name with spaces 'quotes' \"double\" é漢字.jpg"][0])
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.jpg").write_bytes(b"not a picture at all\n" * 10)

    def infer(*extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "image_etl", "infer", str(images), "--out", str(out),
               "--model", str(demo_model_path), "--staging", str(staging), *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    lenient = infer("--max-failed-fraction", "1")
    assert lenient.returncode == 0, lenient.stderr
    assert "3 images (2 failed, 0 resumed)" in lenient.stdout
    again = infer()  # default 0.5; the staging file says 2 of 3 failed
    assert again.returncode == 3, again.stderr
    message = again.stderr.strip().splitlines()[-1]
    assert message.startswith("error: 2 of 3 images failed, more than --max-failed-fraction=0.5")
    assert "empty.jpg: empty file (0 bytes)" in message
    assert "notes.jpg: not an image (unrecognised header)" in message
    assert (out / "labels" / "good.txt").is_file()

    bad_fraction = infer("--max-failed-fraction", "1.5")
    assert bad_fraction.returncode == 2
    assert "invalid parameter max_failed_fraction: must be between 0 and 1" in bad_fraction.stderr
    bad_device = infer("--device", "gpu7")
    assert bad_device.returncode == 2
    assert bad_device.stderr.strip().startswith(
        "error: invalid parameter device: unknown device 'gpu7'; use 'auto', 'cpu'")
