"""Sliced inference against SAHI (sahi 0.12.8, requirements-test.txt), the library our users
know: the same slice grid, the same merge, and end to end the same detections as
``get_sliced_prediction(..., batch_size=1)`` on the same decoded RGB arrays.

What cannot be identical: our forward pass runs batches of slices (of several images), SAHI
one slice at a time; on a CPU the batch size changes the last float bits of the model's
outputs, so end to end the detections are matched (same class, IoU >= 0.9, confidence within
0.01), not compared bit for bit. Given the same boxes, the merge is compared exactly.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest
from sahi import AutoDetectionModel
from sahi.postprocess.backends import set_postprocess_backend
from sahi.postprocess.combine import GreedyNMMPostprocess, NMMPostprocess, NMSPostprocess
from sahi.predict import get_sliced_prediction
from sahi.prediction import ObjectPrediction
from sahi.slicing import get_slice_bboxes

from image_etl import synth
from image_etl.errors import SettingsError
from image_etl.output_paths import OutputLayout
from image_etl.settings import InferSettings
from image_etl.slicing import Merger, slice_grid
from image_etl.staging import read_staging
from image_etl.worker import ImageTask, run_shard

from .conftest import DEMO_MODEL
from .helpers import iou

set_postprocess_backend("numpy")  # the reference backend (torchvision's NMS drops IoU > t)


# --- the grid ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("h", "w"), [(12000, 2048), (3000, 1000), (1919, 703), (640, 640),
                                      (500, 333), (641, 1281), (12000, 639), (100, 5000)])
@pytest.mark.parametrize(("slice_hw", "overlap"), [((640, 640), 0.2), ((512, 768), 0.25),
                                                   ((320, 320), 0.0), ((1024, 1024), 0.5)])
def test_slice_grid_is_sahis(h, w, slice_hw, overlap):
    theirs = get_slice_bboxes(h, w, slice_height=slice_hw[0], slice_width=slice_hw[1],
                              overlap_height_ratio=overlap, overlap_width_ratio=overlap)
    assert slice_grid(h, w, slice_hw, overlap).tolist() == theirs


def test_the_line_scan_grid():
    grid = slice_grid(12000, 2048, (640, 640), 0.2)
    assert len(grid) == 96 and sorted(set(grid[:, 0].tolist())) == [0, 512, 1024, 1408]
    assert grid[:, 3].max() == 12000 and ((grid[:, 2:] - grid[:, :2]) == 640).all()


# --- the merge, given the same boxes ---------------------------------------------------------------

def _boxes(rng: np.random.Generator, n: int, width: int, height: int, classes: int = 2,
           ties: bool = False) -> np.ndarray:
    """Clusters of overlapping boxes, as neighbouring slices give: rows as DET_FIELDS."""
    centres = rng.uniform((0, 0), (width, height), (max(1, n // 6), 2))
    pick = centres[rng.integers(0, len(centres), n)]
    size = rng.uniform(8, 60, (n, 2))
    jitter = rng.normal(0, 6, (n, 2))
    x1y1 = np.clip(pick + jitter - size / 2, 0, (width - 8, height - 8))
    x2y2 = np.minimum(x1y1 + size, (width, height))  # never degenerate: SAHI drops those first
    score = rng.uniform(0.25, 1.0, n).astype(np.float32)
    if ties:
        score = np.round(score * 8) / 8
    rows = np.zeros((n, 10))
    rows[:, 0] = rng.integers(0, classes, n)
    rows[:, 1] = score
    rows[:, 2:4], rows[:, 4:6] = x1y1.astype(np.float32), x2y2.astype(np.float32)
    return rows


def _sahi_merge(rows: np.ndarray, merge: str, metric: str, threshold: float, agnostic: bool):
    preds = [ObjectPrediction(bbox=r[2:6].tolist(), category_id=int(r[0]), category_name=str(int(r[0])),
                              score=float(r[1])) for r in rows]
    kind = {"greedynmm": GreedyNMMPostprocess, "nmm": NMMPostprocess, "nms": NMSPostprocess}[merge]
    out = kind(match_threshold=threshold, match_metric=metric.upper(), class_agnostic=agnostic)(preds)
    return [(p.category.id, float(p.score.value), *map(float, p.bbox.to_xyxy())) for p in out]


@pytest.mark.parametrize("merge", ["greedynmm", "nmm", "nms"])
@pytest.mark.parametrize("metric", ["ios", "iou"])
@pytest.mark.parametrize("agnostic", [False, True], ids=["per-class", "agnostic"])
@pytest.mark.parametrize(("n", "ties"), [(60, False), (400, True), (2500, False)],
                         ids=["60", "400-ties", "2500-sparse"])
def test_merge_equals_sahis_postprocess(merge, metric, agnostic, n, ties):
    """Exactly SAHI's result, in SAHI's order; 2500 boxes take SAHI's sparse path."""
    rng = np.random.default_rng([n, len(merge), len(metric), agnostic])
    rows = _boxes(rng, n, 2048, 12000 if n > 100 else 2048, ties=ties)
    ours = Merger(merge, metric, 0.5, agnostic)(rows, 2048, 12000)
    theirs = _sahi_merge(rows, merge, metric, 0.5, agnostic)
    assert len(ours) < n  # something was merged
    assert [(int(r[0]), float(r[1]), *r[2:6].tolist()) for r in ours] == theirs


def test_merge_is_vectorised_for_tens_of_thousands_of_boxes():
    """SAHI issue #1395: 33k boxes took 14 s with a dense matrix. Here only overlapping pairs
    are compared; the result is still SAHI's (its sparse path)."""
    rows = _boxes(np.random.default_rng(33), 33_000, 2048, 120_000)
    ours = Merger()(rows, 2048, 120_000)
    assert [(int(r[0]), float(r[1]), *r[2:6].tolist()) for r in ours] == \
        _sahi_merge(rows, "greedynmm", "ios", 0.5, False)


def test_merged_rows_carry_the_normalised_box():
    rows = np.array([[1, 0.9, 100, 200, 140, 260, 0, 0, 0, 0],
                     [1, 0.5, 110, 210, 150, 250, 0, 0, 0, 0]], dtype=np.float64)
    [merged] = Merger()(rows, 2048, 12000)
    assert merged[:6].tolist() == [1, 0.9, 100, 200, 150, 260]
    assert merged[6:].tolist() == pytest.approx([125 / 2048, 230 / 12000, 50 / 2048, 60 / 12000])


# --- end to end against get_sliced_prediction -----------------------------------------------------

PARITY_IMAGES = [  # (w, h, gray): the line scan, sizes that are no multiple of slice or stride
    (2048, 12000, False), (1000, 3000, False), (703, 1919, False), (1500, 1000, True),
    (640, 480, False), (333, 2222, True)]


@pytest.fixture(scope="module")
def parity_drop(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sliced_parity")
    for i, (w, h, gray) in enumerate(PARITY_IMAGES):
        img, _ = synth.render(np.random.default_rng([13, i]), w, h, defects="small")
        if gray:
            img = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
            ok, buf = cv2.imencode(".jpg", img[..., 0], [cv2.IMWRITE_JPEG_QUALITY, 90])
            (root / f"img_{i}_{w}x{h}_gray.jpg").write_bytes(buf.tobytes())
        else:
            synth.write_image(root / f"img_{i}_{w}x{h}.jpg", img)
    return root


@pytest.fixture(scope="module")
def sahi_model():
    return AutoDetectionModel.from_pretrained(model_type="ultralytics", model_path=str(DEMO_MODEL),
                                              confidence_threshold=0.25, device="cpu")


def _match(ours: list, theirs: list) -> int:
    """Pairs of the same class with IoU >= 0.9 and confidences within 0.01."""
    used: set[int] = set()
    hits = 0
    for cls, conf, box in ours:
        for j, (tcls, tconf, tbox) in enumerate(theirs):
            if j not in used and tcls == cls and abs(tconf - conf) <= 0.01 and iou(box, tbox) >= 0.9:
                used.add(j)
                hits += 1
                break
    return hits


@pytest.mark.slow
@pytest.mark.parametrize(("merge", "metric", "full"), [("greedynmm", "ios", True),
                                                       ("nms", "iou", True),
                                                       ("greedynmm", "ios", False)],
                         ids=["greedynmm-ios", "nms-iou", "no-full-image-pass"])
def test_detections_match_get_sliced_prediction(merge, metric, full, parity_drop, sahi_model,
                                                tmp_path, capsys):
    from image_etl.model import load_model

    model = load_model(DEMO_MODEL, "cpu", runtime="torch")  # SAHI runs PyTorch
    settings = InferSettings(slice_size=640, slice_overlap=0.2, full_image_pass=full, merge=merge,
                             merge_metric=metric, batch_size=8, runtime="torch")
    paths = sorted(parity_drop.glob("*.jpg"))
    staging = tmp_path / "staging.jsonl"
    run_shard([ImageTask(p, p.name) for p in paths], model, settings, OutputLayout(tmp_path),
              staging_path=staging)
    ours_by_image = {r["rel_path"]: r for r in read_staging(staging)[1]}
    total = matched = 0
    for path in paths:
        rgb = cv2.imread(str(path))[..., ::-1]  # the pixels our decoder gives, as RGB
        result = get_sliced_prediction(rgb, sahi_model, slice_height=640, slice_width=640,
                                       overlap_height_ratio=0.2, overlap_width_ratio=0.2,
                                       perform_standard_pred=full, postprocess_type=merge.upper(),
                                       postprocess_match_metric=metric.upper(),
                                       postprocess_match_threshold=0.5, batch_size=1, verbose=0)
        theirs = [(p.category.id, float(p.score.value), p.bbox.to_xyxy())
                  for p in result.object_prediction_list]
        ours = [(int(d[0]), d[1], d[2:6]) for d in ours_by_image[path.name]["detections"]]
        assert abs(len(ours) - len(theirs)) <= max(1, len(theirs) // 100), path.name
        total += len(theirs)
        matched += _match(ours, theirs)
    with capsys.disabled():
        print(f"\n{merge}/{metric}{'' if full else ', no full-image pass'}: {matched} of {total} "
              f"SAHI detections matched")
    assert total >= 100, "parity on images with real detections"
    assert matched >= 0.99 * total


# --- settings and the worker in sliced mode -------------------------------------------------

def test_fast_decode_is_refused_with_slicing():
    with pytest.raises(SettingsError, match="fast_decode: cannot be combined with slice_size"):
        InferSettings(slice_size=640, fast_decode=True)


def test_slicing_settings_are_part_of_the_result_fingerprint():
    whole = InferSettings().result_fingerprint("m", 640)
    prints = {InferSettings(**kw).result_fingerprint("m", 640) for kw in (
        {"slice_size": 640}, {"slice_size": "640x480"}, {"slice_size": 640, "slice_overlap": 0.3},
        {"slice_size": 640, "full_image_pass": False}, {"slice_size": 640, "merge": "nms"},
        {"slice_size": 640, "merge_metric": "iou"}, {"slice_size": 640, "merge_threshold": 0.6},
        {"slice_size": 640, "merge_class_agnostic": True})}
    assert len(prints) == 8 and whole not in prints
    assert InferSettings(merge="nms").result_fingerprint("m", 640) == whole  # unused when off


@pytest.mark.slow
def test_sliced_retry_and_annotated_images(parity_drop, cpu_model, tmp_path, monkeypatch):
    """A crash mid-shard, then the retry: the same txt bytes as one clean run; annotated
    images are drawn from the full-resolution image."""
    import simplejpeg

    paths = sorted(parity_drop.glob("*.jpg"))[1:]  # the smaller ones
    tasks = [ImageTask(p, p.name) for p in paths]
    settings = InferSettings(slice_size=320, batch_size=4, save_annotated=True)
    clean = tmp_path / "clean"
    run_shard(tasks, cpu_model, settings, OutputLayout(clean), staging_path=tmp_path / "c.jsonl")
    calls = itertools.count(1)
    real = simplejpeg.decode_jpeg

    def flaky(*args, **kwargs):
        if next(calls) == 5:  # the first image of the second group of 4
            raise RuntimeError("decoder bug (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(simplejpeg, "decode_jpeg", flaky)
    retried = tmp_path / "retried"
    with pytest.raises(RuntimeError, match="injected"):
        run_shard(tasks, cpu_model, settings, OutputLayout(retried), staging_path=tmp_path / "r.jsonl")
    monkeypatch.undo()
    report = run_shard(tasks, cpu_model, settings, OutputLayout(retried),
                       staging_path=tmp_path / "r.jsonl")
    assert report.resumed >= 1 and report.resumed + report.processed == len(tasks)

    def labels(root: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in (root / "labels").glob("*.txt")}

    assert labels(retried) == labels(clean) and any(labels(clean).values())
    for p in paths:
        drawn = cv2.imread(str(clean / "annotated" / p.name))
        assert drawn is not None and drawn.shape[:2] == cv2.imread(str(p)).shape[:2]


# --- a rectangular imgsz, whole-image mode --------------------------------------------------------

def test_rectangular_imgsz_equals_model_predict(parity_drop, cpu_model, tmp_path):
    from ultralytics import YOLO

    path = next(p for p in sorted(parity_drop.glob("*.jpg")) if "1000x3000" in p.name)
    staging = tmp_path / "s.jsonl"
    run_shard([ImageTask(path, path.name)], cpu_model, InferSettings(imgsz="1300x430"),
              OutputLayout(tmp_path), staging_path=staging)
    header, [record] = read_staging(staging)
    assert header["imgsz"] == "1312x448"  # each side rounded up to the stride, as Ultralytics does
    r = YOLO(str(DEMO_MODEL)).predict(str(path), imgsz=[1300, 430], conf=0.25, iou=0.7,
                                      verbose=False)[0]
    theirs = sorted(zip(r.boxes.cls.int().tolist(), r.boxes.conf.tolist(), r.boxes.xyxy.tolist()),
                    key=lambda t: (t[0], t[2][1], t[2][0]))
    mine = sorted(((int(d[0]), d[1], d[2:6]) for d in record["detections"]),
                  key=lambda t: (t[0], t[2][1], t[2][0]))
    assert len(mine) == len(theirs) >= 3
    for (ca, pa, ba), (cb, pb, bb) in zip(mine, theirs):
        assert ca == cb and abs(pa - pb) <= 1e-3 and max(abs(a - b) for a, b in zip(ba, bb)) <= 1.0


# --- what slicing is for: small defects ------------------------------------------------------------

SMALL_MODEL = DEMO_MODEL.parent / "small-defects-yolo11n-320.pt"


@pytest.mark.slow
def test_small_defects_are_found_sliced_and_missed_whole(tmp_path_factory, capsys):
    """A fresh small-defect drop (8-48 px defects on 2048 x 12000 frames, a seed the model
    never saw): sliced inference with the shipped small-defect model finds them; the same
    model on the whole image, shrunk 37x to its 320 px input, cannot."""
    import datetime as dt

    from image_etl.model import load_model

    assert SMALL_MODEL.is_file(), f"{SMALL_MODEL} missing (make train-small-defect-model)"
    day = dt.date(2026, 6, 1)
    root = tmp_path_factory.mktemp("small_defects")
    paths = synth.make_drop(root, day, 3, defects="small", seed=60601)
    model = load_model(SMALL_MODEL, "cpu", runtime="auto")
    scores = {}
    for mode, settings in (("sliced", InferSettings(slice_size=model.default_imgsz)),
                           ("whole", InferSettings())):
        staging = tmp_path_factory.mktemp(mode) / "s.jsonl"
        run_shard([ImageTask(p, p.name) for p in paths], model, settings,
                  OutputLayout(staging.parent), staging_path=staging)
        tp = n_pred = n_true = 0
        for record in read_staging(staging)[1]:
            truth = synth.read_labels(synth.truth_path(root, day, record["rel_path"]), 2048, 12000)
            preds = [(int(d[0]), tuple(d[2:6])) for d in record["detections"]]
            tp += synth.count_matches(preds, truth)
            n_pred, n_true = n_pred + len(preds), n_true + len(truth)
        scores[mode] = (tp / n_true, tp / max(n_pred, 1), n_true)
    with capsys.disabled():
        print(f"\nsmall defects, {scores['sliced'][2]} in 3 images: sliced recall "
              f"{scores['sliced'][0]:.3f} precision {scores['sliced'][1]:.3f}; whole-image "
              f"recall {scores['whole'][0]:.3f} precision {scores['whole'][1]:.3f}")
    assert scores["sliced"][2] >= 40
    assert scores["sliced"][0] >= 0.90 and scores["sliced"][1] >= 0.90
    assert scores["whole"][0] < 0.5  # why slicing matters
