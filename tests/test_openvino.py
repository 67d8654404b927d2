"""The OpenVINO runtime for CPU devices: same detections as PyTorch, exported once, safely."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from image_etl.backends import openvino_backend
from image_etl.model import ModelLoadError, load_model, resolve_precision, resolve_runtime
from image_etl.output_paths import OutputLayout
from image_etl.run_settings import RunSettings
from image_etl.settings import InferSettings, SettingsError
from image_etl.staging import read_staging
from image_etl.worker import ImageTask, run_shard

from .conftest import DROP_DATE, ROOT
from .helpers import match

pytestmark = pytest.mark.skipif(not openvino_backend.available(), reason="openvino not installed")


def test_runtime_resolution():
    assert resolve_runtime("auto", "cpu") == "openvino"
    assert resolve_runtime("auto", "cuda") == "torch"  # GPUs always run PyTorch
    assert resolve_runtime("torch", "cpu") == "torch"
    with pytest.raises(ModelLoadError, match="runtime 'openvino' runs on CPU devices only"):
        resolve_runtime("openvino", "cuda")
    with pytest.raises(SettingsError,
                       match="^invalid parameter runtime: expected one of auto, torch, openvino"):
        InferSettings(runtime="tensorrt")
    settings = RunSettings.from_params({"model_path": str(ROOT / "models/demo-yolo11n-2cls.pt"),
                                        "drop_dir": "/d/{date}", "output_dir": "/o",
                                        "runtime": "torch"}, DROP_DATE)
    assert settings.infer.runtime == "torch" and settings.to_dict()["runtime"] == "torch"
    # Staged work of one runtime is never resumed by the other.
    s = InferSettings()
    assert s.result_fingerprint("abc", 640, "torch") != s.result_fingerprint("abc", 640, "openvino")


def test_precision_resolution():
    assert resolve_precision("auto", "cpu", "openvino") == "fp32"
    assert resolve_precision("auto", "cpu", "torch") == "fp32"
    assert resolve_precision("auto", "cuda", "torch") == "fp16"
    assert resolve_precision("bf16", "cpu", "openvino") == "bf16"
    assert resolve_precision("fp32", "cuda", "torch") == "fp32"
    with pytest.raises(ModelLoadError, match="precision 'fp16' runs on CUDA devices only"):
        resolve_precision("fp16", "cpu", "openvino")
    with pytest.raises(ModelLoadError, match="precision 'bf16' runs on CPU devices with runtime "
                                             "'openvino', not on cpu with runtime 'torch'"):
        resolve_precision("bf16", "cpu", "torch")
    with pytest.raises(ModelLoadError, match="not on cuda"):
        resolve_precision("bf16", "cuda", "torch")
    with pytest.raises(SettingsError,
                       match="^invalid parameter precision: expected one of auto, fp32, fp16, bf16"):
        InferSettings(precision="int8")
    # A retry never mixes precisions in one shard; fp32 keeps the fingerprint it always had.
    s = InferSettings()
    assert s.result_fingerprint("abc", 640, "openvino") == s.result_fingerprint(
        "abc", 640, "openvino", "fp32")
    assert s.result_fingerprint("abc", 640, "openvino", "bf16") != s.result_fingerprint(
        "abc", 640, "openvino", "fp32")


def test_bf16_on_a_cpu_that_computes_it_or_a_clear_refusal(demo_model_path, ov_model, small_drop,
                                                             tmp_path):
    """bf16 is OpenVINO's own choice on AMX parts: it runs in bf16 (not quietly in fp32) and
    finds the fp32 detections to rounding; a CPU without bf16 refuses it at load, naming why."""
    if not openvino_backend.cpu_computes_bf16():
        with pytest.raises(ModelLoadError, match="needs a CPU with AVX512-BF16 or AMX"):
            load_model(demo_model_path, "cpu", precision="bf16", runtime="openvino")
        return
    bf16 = load_model(demo_model_path, "cpu", precision="bf16", runtime="auto")
    assert (bf16.runtime, bf16.precision) == ("openvino", "bf16")
    drop = small_drop / DROP_DATE.isoformat()
    low = _detections(bf16, drop, tmp_path / "bf16")
    assert bf16.backend.compiled_precision == "bf16"
    assert read_staging(tmp_path / "bf16" / "staged.jsonl")[0]["precision"] == "bf16"
    full = _detections(ov_model, drop, tmp_path / "fp32")
    assert ov_model.backend.compiled_precision == "f32"
    n_full = sum(len(d) for d in full.values())
    matched = sum(match([(int(d[0]), tuple(d[2:6])) for d in low[name]],
                        [(int(d[0]), tuple(d[2:6])) for d in theirs], thr=0.9)
                  for name, theirs in full.items())
    assert n_full > 0 and matched >= 0.95 * n_full, (matched, n_full)
    assert sum(len(d) for d in low.values()) <= 1.05 * n_full


@pytest.fixture(scope="module")
def ov_model(demo_model_path, tmp_path_factory):
    cache = tmp_path_factory.mktemp("ov_cache")
    old = os.environ.get("IMAGE_ETL_CACHE_DIR")
    os.environ["IMAGE_ETL_CACHE_DIR"] = str(cache)
    try:
        yield load_model(demo_model_path, "cpu", runtime="auto")
    finally:
        if old is None:
            os.environ.pop("IMAGE_ETL_CACHE_DIR")
        else:
            os.environ["IMAGE_ETL_CACHE_DIR"] = old


def _detections(model, drop: Path, out: Path, fast: bool = False) -> dict[str, list]:
    tasks = [ImageTask(p, p.name) for p in sorted(drop.glob("*.jpg"))]
    run_shard(tasks, model, InferSettings(fast_decode=fast, batch_size=4), OutputLayout(out),
              out / "staged.jsonl")
    return {r["rel_path"]: r["detections"] for r in read_staging(out / "staged.jsonl")[1]}


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
def test_openvino_detections_equal_pytorch(ov_model, cpu_model, small_drop, tmp_path, fast):
    assert ov_model.runtime == "openvino" and cpu_model.runtime == "torch"
    assert (ov_model.names, ov_model.stride) == (cpu_model.names, cpu_model.stride)
    drop = small_drop / DROP_DATE.isoformat()
    ov = _detections(ov_model, drop, tmp_path / "ov", fast)
    pt = _detections(cpu_model, drop, tmp_path / "pt", fast)
    assert sorted(ov) == sorted(pt) and sum(len(d) for d in pt.values()) > 0
    for name, theirs in pt.items():
        mine = ov[name]
        assert len(mine) == len(theirs), name
        for a, b in zip(sorted(mine), sorted(theirs)):
            assert a[0] == b[0], name  # class
            assert abs(a[1] - b[1]) <= 1e-3, name  # confidence
            assert max(abs(x - y) for x, y in zip(a[2:6], b[2:6])) <= 1.0, name  # xyxy px


def test_export_is_cached_and_reused(ov_model):
    xml = ov_model.backend.xml
    cache = Path(os.environ.get("IMAGE_ETL_CACHE_DIR", "")) / "openvino"
    assert xml.is_file() and xml.parent.parent == cache
    mtime = xml.stat().st_mtime_ns
    again = openvino_backend.exported_model(ov_model.path, ov_model.sha256, ov_model.default_imgsz)
    assert again == xml and again.stat().st_mtime_ns == mtime
    assert [p.name for p in cache.iterdir()] == [xml.parent.name]  # no temporary leftovers


def test_concurrent_first_exports_leave_one_copy(demo_model_path, tmp_path):
    """Two workers starting at once on a fresh host: both load, one cached copy remains."""
    code = ("import json, sys; from image_etl.model import load_model; "
            "m = load_model(sys.argv[1], 'cpu', runtime='openvino'); "
            "print(json.dumps([str(m.backend.xml), m.runtime]))")
    env = {**os.environ, "IMAGE_ETL_CACHE_DIR": str(tmp_path), "YOLO_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(demo_model_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert results[0] == results[1] and results[0][1] == "openvino"
    assert [p.name for p in (tmp_path / "openvino").iterdir()] == [Path(results[0][0]).parent.name]


def test_unusable_cache_dir_is_one_clear_error(demo_model_path, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("IMAGE_ETL_CACHE_DIR", str(blocker))
    with pytest.raises(ModelLoadError, match="cannot prepare the OpenVINO copy .*IMAGE_ETL_CACHE_DIR"):
        load_model(demo_model_path, "cpu", runtime="openvino")


def test_an_image_gets_the_same_result_in_any_batch(ov_model, small_drop):
    """OpenVINO runs each image of a batch as its own request: its detections do not depend on
    the batch it came in (a resumed shard may batch it with other images)."""
    from image_etl.decode import Decoder
    from image_etl.forward import detect_batch

    paths = sorted((small_drop / DROP_DATE.isoformat()).glob("*.jpg"))[:4]
    decoder = Decoder(ov_model.default_imgsz, ov_model.stride)
    items = [decoder(i, p, p.name) for i, p in enumerate(paths)]
    together = detect_batch(ov_model, items, 0.25, 0.7)
    alone = [detect_batch(ov_model, [item], 0.25, 0.7)[0] for item in items]
    reversed_ = detect_batch(ov_model, items[::-1], 0.25, 0.7)[::-1]
    assert sum(len(d) for d in alone) > 0
    for a, b, c in zip(together, alone, reversed_):
        assert a.tobytes() == b.tobytes() == c.tobytes()


def test_cli_precision(small_drop, demo_model_path, tmp_path):
    """``infer --precision``: refused before any image where the device cannot do it; bf16
    recorded in the summary and the staging header where the CPU computes it."""
    images = small_drop / DROP_DATE.isoformat()
    base = [sys.executable, "-m", "image_etl", "infer", str(images), "--model",
            str(demo_model_path), "--device", "cpu"]
    env = {**os.environ, "YOLO_OFFLINE": "1"}
    refused = subprocess.run([*base, "--out", str(tmp_path / "refused"), "--precision", "fp16"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert "precision 'fp16' runs on CUDA devices only" in refused.stderr
    assert not (tmp_path / "refused").exists()
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    proc = subprocess.run([*base, "--out", str(out), "--precision", "bf16", "--staging",
                           str(tmp_path / "staged.jsonl"), "--summary", str(summary)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if not openvino_backend.cpu_computes_bf16():
        assert proc.returncode == 1 and "needs a CPU with AVX512-BF16 or AMX" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(summary.read_text())["settings"]["precision"] == "bf16"
    assert read_staging(tmp_path / "staged.jsonl")[0]["precision"] == "bf16"


# --- no unbounded wait: the two ways of running a batch ---------------------------------------------

def test_both_modes_agree_and_neither_waits_on_an_async_queue(ov_model, small_drop, monkeypatch):
    """``sync`` (one batched request) and ``streams`` (a request per image, bounded waits) give
    the same predictions; neither uses AsyncInferQueue, whose wait_all() can hang forever
    (ultralytics#25923). Old code: one mode, AsyncInferQueue.wait_all()."""
    import numpy as np
    import openvino

    from image_etl.decode import Decoder

    class NoAsyncQueue:
        def __init__(self, *args, **kwargs) -> None:
            raise AssertionError("AsyncInferQueue used: its wait_all() has no bound")

    monkeypatch.setattr(openvino, "AsyncInferQueue", NoAsyncQueue)
    paths = sorted((small_drop / DROP_DATE.isoformat()).glob("*.jpg"))[:3]
    decoder = Decoder(ov_model.default_imgsz, ov_model.stride)
    batch = np.stack([decoder(i, p, p.name).input for i, p in enumerate(paths)])
    default = openvino_backend.OpenVINOBackend(ov_model.backend.xml, "fp32")
    preds = {"default": default.infer(batch).numpy()}  # old code: AsyncInferQueue
    assert default.mode == "streams"  # the default (bench/README.md says why)
    preds.update({mode: openvino_backend.OpenVINOBackend(ov_model.backend.xml, "fp32", mode=mode)
                  .infer(batch).numpy() for mode in openvino_backend.MODES})
    assert preds["default"].tobytes() == preds["sync"].tobytes()
    assert preds["sync"].shape == preds["streams"].shape and preds["sync"].shape[0] == 3
    boxes, scores = (slice(None, 4), slice(4, None))
    np.testing.assert_allclose(preds["sync"][:, boxes], preds["streams"][:, boxes], atol=0.05)
    np.testing.assert_allclose(preds["sync"][:, scores], preds["streams"][:, scores], atol=1e-4)


def test_the_mode_comes_from_the_environment_and_a_bad_one_is_refused(monkeypatch):
    monkeypatch.setenv("IMAGE_ETL_OPENVINO_MODE", "streams")
    assert openvino_backend.default_mode() == "streams"
    monkeypatch.setenv("IMAGE_ETL_OPENVINO_MODE", "queue")
    with pytest.raises(ValueError, match="invalid parameter IMAGE_ETL_OPENVINO_MODE: 'queue'"):
        openvino_backend.default_mode()


def test_a_request_that_never_finishes_is_cancelled_and_reported(monkeypatch):
    """``streams`` mode waits for each request in short steps, up to a bound, then cancels what
    runs and raises (a request of the real runtime cannot be made to hang on purpose: this one
    stands in for it)."""
    class NeverDone:
        def __init__(self) -> None:
            self.cancelled = False

        def wait_for(self, ms: int) -> bool:
            time.sleep(ms / 1000)
            return False

        def cancel(self) -> None:
            self.cancelled = True

    monkeypatch.setattr(openvino_backend, "REQUEST_TIMEOUT_S", 0.3)
    stuck, other = NeverDone(), NeverDone()
    t0 = time.monotonic()
    with pytest.raises(openvino_backend.OpenVINOStuckError, match="did not finish within"):
        openvino_backend._wait_bounded(stuck, [stuck, other], step_ms=50)
    assert time.monotonic() - t0 < 2 and stuck.cancelled and other.cancelled
