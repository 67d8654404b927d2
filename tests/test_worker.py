"""The worker on the real demo model, on the CPU: parity, accuracy, no loss, failure, re-runs."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from image_etl import synth
from image_etl.output_paths import OutputLayout
from image_etl.settings import InferSettings
from image_etl.staging import read_staging
from image_etl.worker import OutputSink, run_shard

from .conftest import DROP_DATE, ROOT
from .helpers import match, staged_by_path, tasks_for


def run(tasks, model, out: Path, staging: Path | None = None, **settings):
    return run_shard(tasks, model, InferSettings(**settings), OutputLayout(out), staging)


# --- parity with model.predict -------------------------------------------------------------

PARITY_SIZES = [(2048, 12000), (2048, 12000), (1024, 6000), (512, 3000), (640, 480),
                (1280, 720), (300, 2000), (2000, 640), (800, 800)]


@pytest.fixture(scope="module")
def parity_images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parity")
    for i, (w, h) in enumerate(PARITY_SIZES):
        img, _ = synth.render(np.random.default_rng([99, i]), w, h)
        synth.write_image(root / f"img_{i}_{w}x{h}.jpg", img)
    return root


@pytest.fixture(scope="module")
def parity_model(parity_case, demo_model_path, request):
    """The demo model on the parity device (``--parity-device``, ``--parity-precision``)."""
    device, half = parity_case
    if device == "cpu":
        return request.getfixturevalue("cpu_model")
    from image_etl.model import load_model

    model = load_model(demo_model_path, device, precision="fp16" if half else "fp32")
    assert model.is_cuda and model.fp16 == half
    return model


def test_exact_mode_equals_model_predict(parity_images, parity_case, parity_model,
                                         demo_model_path, tmp_path, capsys):
    """Ours (batches of 4) and ``YOLO(model).predict`` (one image at a time), same device and
    precision (``--parity-device cuda:0 --parity-precision fp16,fp32`` on a GPU)."""
    from ultralytics import YOLO

    device, half = parity_case
    staging = tmp_path / "stage.jsonl"
    report = run(tasks_for(parity_images), parity_model, tmp_path / "out", staging, batch_size=4)
    assert report.ok == len(PARITY_SIZES)
    ours = staged_by_path(staging)
    yolo = YOLO(str(demo_model_path))
    total, worst_conf, worst_box = 0, 0.0, 0.0
    for path in sorted(parity_images.glob("*.jpg")):
        r = yolo.predict(str(path), imgsz=parity_model.default_imgsz, conf=0.25, iou=0.7,
                         device=device, quantize=16 if half else 32, verbose=False)[0]
        assert r.boxes.data.device.type == torch_device_type(device), path.name
        theirs = sorted(zip(r.boxes.cls.int().tolist(), r.boxes.conf.tolist(),
                            r.boxes.xyxy.tolist()), key=lambda t: (t[0], t[2][1], t[2][0]))
        mine = sorted(((int(d[0]), d[1], d[2:6]) for d in ours[path.name]["detections"]),
                      key=lambda t: (t[0], t[2][1], t[2][0]))
        assert len(mine) == len(theirs), path.name
        assert [c for c, _, _ in mine] == [c for c, _, _ in theirs], path.name
        for (_, conf_a, box_a), (_, conf_b, box_b) in zip(mine, theirs):
            d_conf = abs(conf_a - conf_b)
            d_box = max(abs(a - b) for a, b in zip(box_a, box_b))
            worst_conf, worst_box = max(worst_conf, d_conf), max(worst_box, d_box)
            assert d_conf <= 1e-3, f"{path.name}: conf {conf_a} vs {conf_b}"
            assert d_box <= 1.0, f"{path.name}: box {box_a} vs {box_b}"
        assert (ours[path.name]["height"], ours[path.name]["width"]) == r.orig_shape
        total += len(mine)
    with capsys.disabled():
        print(f"\nparity on {device} {'fp16' if half else 'fp32'}: {total} detections on "
              f"{len(PARITY_SIZES)} images, worst |conf| diff {worst_conf:.2e}, worst box diff "
              f"{worst_box:.3f} px")
    assert total >= 10, "parity on images with real detections"


def torch_device_type(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


# --- accuracy against ground truth -----------------------------------------------------------

def accuracy(drop_root: Path, staged: dict[str, dict]) -> tuple[float, float, int]:
    tp = n_pred = n_true = 0
    for rel, rec in staged.items():
        truth = synth.read_labels(synth.truth_path(drop_root, DROP_DATE, rel), rec["width"],
                                  rec["height"])
        preds = [(int(d[0]), tuple(d[2:6])) for d in rec["detections"]]
        tp += match(preds, [(b.cls, (b.x1, b.y1, b.x2, b.y2)) for b in truth])
        n_pred += len(preds)
        n_true += len(truth)
    return tp / max(n_true, 1), tp / max(n_pred, 1), n_true


@pytest.mark.slow
def test_demo_model_accuracy_exact_and_fast(full_drop, cpu_model, tmp_path, capsys):
    images = full_drop / DROP_DATE.isoformat()
    results = {}
    for mode in ("exact", "fast"):
        staging = tmp_path / f"{mode}.jsonl"
        run(tasks_for(images), cpu_model, tmp_path / mode, staging, fast_decode=mode == "fast")
        results[mode] = staged_by_path(staging)
    recall, precision, n_true = accuracy(full_drop, results["exact"])
    f_recall, f_precision, _ = accuracy(full_drop, results["fast"])
    # Agreement: fast-mode detections matched to exact-mode ones (class-aware, IoU >= 0.5).
    agree = sum(match([(int(d[0]), tuple(d[2:6])) for d in results["fast"][rel]["detections"]],
                      [(int(d[0]), tuple(d[2:6])) for d in rec["detections"]])
                for rel, rec in results["exact"].items())
    n_exact = sum(len(r["detections"]) for r in results["exact"].values())
    with capsys.disabled():
        print(f"\naccuracy on {len(results['exact'])} images, {n_true} objects: exact recall "
              f"{recall:.3f} precision {precision:.3f}; fast recall {f_recall:.3f} precision "
              f"{f_precision:.3f}; fast/exact agreement {agree}/{n_exact}")
    assert n_true >= 60
    assert recall >= 0.90 and precision >= 0.90
    assert f_recall >= 0.85 and f_precision >= 0.85
    assert agree >= 0.9 * n_exact


# --- no loss, failures, re-runs ----------------------------------------------------------------

class SlowSink(OutputSink):
    def write(self, item, dets):
        time.sleep(0.05)
        super().write(item, dets)


class FailingSink(OutputSink):
    def __init__(self, *args, fail_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_at, self.calls = fail_at, 0

    def write(self, item, dets):
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(28, "No space left on device (injected)")
        super().write(item, dets)


def test_slow_writer_with_tiny_queues_loses_nothing(small_drop, cpu_model, tmp_path):
    images = small_drop / DROP_DATE.isoformat()
    tasks = tasks_for(images) * 1
    layout = OutputLayout(tmp_path)
    sink = SlowSink(layout, cpu_model.names)
    settings = InferSettings(batch_size=2, decoded_queue_size=2, write_queue_size=2, decode_workers=2)
    report = run_shard(tasks, cpu_model, settings, layout, sink=sink)
    written = sorted(p.name for p in (tmp_path / "labels").glob("*.txt"))
    assert written == sorted(Path(t.rel_path).with_suffix(".txt").name for t in tasks)
    assert report.processed == report.ok == len(tasks)


@pytest.mark.parametrize("annotated", [False, True], ids=["one-writer", "annotating-writers"])
def test_writer_error_stops_the_shard_promptly(small_drop, cpu_model, tmp_path, annotated):
    images = small_drop / DROP_DATE.isoformat()
    tasks = tasks_for(images) * 4  # enough work that a hang would be obvious
    layout = OutputLayout(tmp_path)
    sink = FailingSink(layout, cpu_model.names, save_annotated=annotated, fail_at=3)
    settings = InferSettings(batch_size=2, write_queue_size=2, save_annotated=annotated,
                             decode_workers=2)
    outcome: dict = {}

    def target():
        try:
            run_shard(tasks, cpu_model, settings, layout, sink=sink)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "run_shard hung after the writer failed"
    assert isinstance(outcome.get("error"), OSError) and "No space left" in str(outcome["error"])
    assert sink.calls < len(tasks), "the pipeline kept going after the failure"
    alive = [t.name for t in threading.enumerate() if t.name.startswith(("decode-", "writer"))]
    assert alive == []


def test_bad_images_become_failed_rows_and_the_rest_go_on(small_drop, cpu_model, tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    good = sorted((small_drop / DROP_DATE.isoformat()).glob("*.jpg"))[:3]
    for p in good:
        (drop / p.name).write_bytes(p.read_bytes())
    (drop / "truncated.jpg").write_bytes(good[0].read_bytes()[:2000])
    (drop / "empty.jpg").write_bytes(b"")
    (drop / "text.jpg").write_text("this is not an image")
    staging = tmp_path / "stage.jsonl"
    report = run(tasks_for(drop), cpu_model, tmp_path / "out", staging)
    staged = staged_by_path(staging)
    assert report.ok == 3 and report.failed == 3
    assert staged["empty.jpg"]["error"] == "empty file (0 bytes)"
    assert "not an image" in staged["text.jpg"]["error"]
    assert "corrupt or truncated" in staged["truncated.jpg"]["error"]
    assert not (tmp_path / "out/labels/empty.txt").exists()
    assert all((tmp_path / "out/labels" / f"{p.stem}.txt").exists() for p in good)


def test_rerun_leaves_byte_identical_txt_files(small_drop, cpu_model, tmp_path):
    images = small_drop / DROP_DATE.isoformat()

    def snapshot():
        return {p.name: p.read_bytes() for p in sorted((tmp_path / "labels").glob("*.txt"))}

    run(tasks_for(images), cpu_model, tmp_path, batch_size=3)
    first = snapshot()
    run(tasks_for(images), cpu_model, tmp_path, batch_size=3)
    assert snapshot() == first
    assert len(first) == 8 and any(first.values())


def test_retry_resumes_from_staging(small_drop, cpu_model, tmp_path):
    images = small_drop / DROP_DATE.isoformat()
    tasks = tasks_for(images)
    layout = OutputLayout(tmp_path / "out")
    staging = tmp_path / "stage.jsonl"
    settings = InferSettings(batch_size=2, write_queue_size=1)
    from image_etl.staging import StagingWriter

    fp = settings.result_fingerprint(cpu_model.sha256, cpu_model.default_imgsz)
    sink = FailingSink(layout, cpu_model.names, fail_at=5, staging=StagingWriter(staging, fp, {}))
    with pytest.raises(OSError):
        run_shard(tasks, cpu_model, settings, layout, sink=sink)
    done_before = len(read_staging(staging)[1])
    assert 1 <= done_before < len(tasks)
    report = run_shard(tasks, cpu_model, settings, layout, staging_path=staging)
    assert report.resumed == done_before
    assert report.processed == len(tasks) - done_before
    assert sorted(staged_by_path(staging)) == sorted(t.rel_path for t in tasks)
    # A different conf changes results: nothing is reused.
    report = run_shard(tasks, cpu_model, InferSettings(conf=0.5), layout, staging_path=staging)
    assert report.resumed == 0 and report.processed == len(tasks)


def test_annotated_image_shows_the_staged_box(tmp_path):
    """The sink draws a known box, scaled from full-size pixels to the decoded (fast-decode,
    half-size) image: its edges are the class colour, inside and outside stay untouched."""
    import cv2

    from image_etl.decode import DecodedImage

    gray = np.full((200, 300, 3), 128, np.uint8)  # decoded at 1/2 of a 400 x 600 image
    item = DecodedImage(index=0, path=tmp_path / "a.jpg", rel_path="a.jpg", bytes=1,
                        orig_shape=(400, 600), decoded_shape=(200, 300), image=gray)
    # cls 0, conf, x1 y1 x2 y2 in full-size pixels, then the normalised centre box.
    dets = np.array([[0, 0.9, 100, 120, 400, 300, 0.4166, 0.525, 0.5, 0.45]])
    sink = OutputSink(OutputLayout(tmp_path / "out"), {0: "car"}, save_annotated=True)
    sink.write(item, dets)
    drawn = cv2.imread(str(tmp_path / "out/annotated/a.jpg")).astype(int)
    assert drawn.shape == (200, 300, 3)
    red = np.array([56, 56, 255])  # BGR of class 0

    def near(y: int, x: int, colour) -> bool:
        return bool(np.abs(drawn[y, x] - colour).max() <= 40)  # JPEG noise

    # The box is at (50, 60)-(200, 150) in the decoded image: its four edges, mid-way along.
    for y, x in ((105, 50), (105, 200), (150, 125)):
        assert near(y, x, red), (y, x, drawn[y, x])
    assert near(60, 190, red)  # the top edge, right of the label
    for y, x in ((105, 125), (190, 280), (105, 20), (175, 125)):  # inside, outside
        assert near(y, x, (128, 128, 128)), (y, x, drawn[y, x])
    assert (tmp_path / "out/labels/a.txt").read_text().startswith("0 ")


def test_cli_infer_writes_summary(small_drop, demo_model_path, tmp_path):
    images = small_drop / DROP_DATE.isoformat()
    summary = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, "-m", "image_etl", "infer", str(images), "--out", str(tmp_path / "out"),
         "--model", str(demo_model_path), "--device", "cpu", "--batch", "4", "--fast-decode",
         "--summary", str(summary)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(summary.read_text())
    assert data["processed"] == data["ok"] == 8 and data["failures"] == []
    assert data["images_per_s"] > 0 and set(data["busy"]) == {"decode", "infer", "write"}
    assert len(list((tmp_path / "out/labels").glob("*.txt"))) == 8
    bad = subprocess.run([sys.executable, "-m", "image_etl", "infer", str(images), "--out",
                          str(tmp_path), "--model", str(demo_model_path), "--conf", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "conf:" in bad.stderr


def test_gpu_out_of_memory_halves_the_batch_and_goes_on(small_drop, cpu_model, tmp_path):
    """CI has no GPU: inject CUDA's out-of-memory error for batches larger than 2."""
    import copy
    import dataclasses

    import torch

    class TightMemory:
        def __init__(self, backend):
            self.backend, self.sizes = backend, []

        def __call__(self, im):
            self.sizes.append(im.shape[0])
            if im.shape[0] > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            return self.backend.infer(im)

    tight = TightMemory(cpu_model.backend)
    backend = copy.copy(cpu_model.backend)
    backend.infer = tight
    model = dataclasses.replace(cpu_model, backend=backend)
    images = small_drop / DROP_DATE.isoformat()
    report = run(tasks_for(images), model, tmp_path / "oom", tmp_path / "oom.jsonl", batch_size=8)
    reference = run(tasks_for(images), cpu_model, tmp_path / "ref", tmp_path / "ref.jsonl",
                    batch_size=2)
    assert report.ok == 8 and report.batch_size == 2
    assert tight.sizes[:3] == [8, 4, 2]  # halved until it fit, then kept small
    assert max(tight.sizes[3:]) <= 2
    labels = sorted((tmp_path / "oom/labels").glob("*.txt"))
    assert [p.read_bytes() for p in labels] == [
        (tmp_path / "ref/labels" / p.name).read_bytes() for p in labels]
    assert reference.ok == 8


def test_progress_line_reports_decode_as_it_goes(small_drop, cpu_model, tmp_path, caplog):
    """The progress line's busy figures are live, decode's included (it was 0 % until the end)."""
    import logging
    import re

    images = small_drop / DROP_DATE.isoformat()
    settings = InferSettings(batch_size=2, decode_workers=1, progress_every_s=0.1)
    with caplog.at_level(logging.INFO, logger="image_etl.worker"):
        run_shard(tasks_for(images) * 3, cpu_model, settings, OutputLayout(tmp_path))
    decode = [int(m.group(1)) for m in re.finditer(r"progress .* decode (\d+)%", caplog.text)]
    assert decode and max(decode) > 0, caplog.text[-2000:]
