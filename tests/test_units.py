"""Unit tests without the model: settings, devices, lease, txt format, layout, staging, discovery."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from image_etl import synth
from image_etl.atomic_files import atomic_write
from image_etl.decode import reduction_factor
from image_etl.devices import lease, parse_devices
from image_etl.discover import list_images
from image_etl.output_paths import OutputLayout, OutputPathError
from image_etl.settings import InferSettings, SettingsError, absolute_path
from image_etl.staging import StagingWriter, read_staging
from image_etl.yolo_txt import format_txt


@pytest.mark.parametrize(("spec", "gpus", "expected"), [
    ("auto", 0, ["cpu"]),
    ("auto", 2, ["cuda:0", "cuda:1"]),
    ("cpu", 0, ["cpu"]),
    ("cpu,cpu", 0, ["cpu", "cpu"]),
    ("0,1,3", 4, ["cuda:0", "cuda:1", "cuda:3"]),
    (" cuda:0 , cuda:1 ", 2, ["cuda:0", "cuda:1"]),
    (["cuda:1", "0"], 2, ["cuda:1", "cuda:0"]),
])
def test_parse_devices(spec, gpus, expected):
    assert parse_devices(spec, available_gpus=gpus) == expected


@pytest.mark.parametrize(("spec", "gpus", "message"), [
    ("", 0, "empty"),
    ("gpu0", 1, "unknown device"),
    ("2", 2, "does not exist"),
    ("0,cuda:0", 1, "listed twice"),
])
def test_parse_devices_refuses(spec, gpus, message):
    with pytest.raises(SettingsError, match=message) as info:
        parse_devices(spec, available_gpus=gpus)
    assert str(info.value).startswith("invalid parameter devices:")


def test_lease_is_exclusive_per_device(tmp_path):
    with lease("cuda:0", lock_dir=tmp_path):
        # A second holder of the same device waits, then gives up with a clear message.
        with pytest.raises(TimeoutError, match="cuda:0 stayed busy"):
            with lease("cuda:0", lock_dir=tmp_path, timeout_s=0.3, poll_s=0.05):
                pass
        with lease("cuda:1", lock_dir=tmp_path, timeout_s=0.3):  # another device is free
            pass
    with lease("cuda:0", lock_dir=tmp_path, timeout_s=0.3):  # released on exit
        pass


def test_lease_released_when_holder_dies(tmp_path):
    pid = os.fork()
    if pid == 0:  # child: take the lease and die without releasing it
        try:
            with lease("cuda:0", lock_dir=tmp_path):
                os._exit(0)
        finally:
            os._exit(1)
    os.waitpid(pid, 0)
    with lease("cuda:0", lock_dir=tmp_path, timeout_s=1):
        pass


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"conf": 1.5}, "conf"), ({"iou": -0.1}, "iou"), ({"batch_size": 0}, "batch_size"),
    ({"imgsz": 16385}, "imgsz"), ({"imgsz": "big"}, "imgsz"), ({"fast_decode": "maybe"}, "fast_decode"),
    ({"batch_size": 2.5}, "batch_size"), ({"conf": True}, "conf"),
])
def test_settings_refuse_bad_values_naming_them(kwargs, name):
    with pytest.raises(SettingsError) as info:
        InferSettings(**kwargs)
    assert info.value.name == name and str(info.value).startswith(f"invalid parameter {name}:")


def test_settings_coerce_form_strings():
    s = InferSettings(imgsz="640", conf="0.3", batch_size="4", fast_decode="true")
    assert (s.imgsz, s.conf, s.batch_size, s.fast_decode) == (640, 0.3, 4, True)


def test_fingerprint_changes_with_result_settings_only():
    base = InferSettings()
    assert base.result_fingerprint("a", 640) == InferSettings(batch_size=2).result_fingerprint("a", 640)
    assert base.result_fingerprint("a", 640) != InferSettings(conf=0.3).result_fingerprint("a", 640)
    assert base.result_fingerprint("a", 640) != base.result_fingerprint("b", 640)
    assert base.result_fingerprint("a", 640) != base.result_fingerprint("a", 320)


def test_absolute_path_rules(tmp_path):
    assert absolute_path("drop_dir", str(tmp_path)) == tmp_path
    for bad in ("relative/dir", "", None, "/data/../etc"):
        with pytest.raises(SettingsError, match="drop_dir"):
            absolute_path("drop_dir", bad)
    with pytest.raises(SettingsError, match="not under an allowed root"):
        absolute_path("drop_dir", "/etc/passwd", allowed_roots=(Path("/data"),))


def test_format_txt_matches_ultralytics_save_txt(tmp_path):
    """Byte for byte what Results.save_txt(save_conf=True) writes for the same boxes."""
    import torch
    from ultralytics.engine.results import Results

    h, w = 12000, 2048
    boxes = torch.tensor([[10.5, 20.25, 300.0, 400.75, 0.912345678, 1.0],
                          [0.0, 11000.0, 2048.0, 12000.0, 0.25, 0.0]])
    res = Results(np.zeros((h, w, 3), np.uint8), path="x.jpg", names={0: "a", 1: "b"}, boxes=boxes)
    theirs = tmp_path / "theirs.txt"
    res.save_txt(theirs, save_conf=True)
    xywhn = res.boxes.xywhn.numpy()
    dets = np.concatenate([boxes[:, [5, 4]].numpy(), boxes[:, :4].numpy(), xywhn], 1)
    assert format_txt(dets) == theirs.read_text()
    assert format_txt(np.zeros((0, 10), np.float32)) == ""


def test_atomic_write_overwrites_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "b.txt"
    atomic_write(target, "first, longer content\n")
    atomic_write(target, "second\n")
    assert target.read_text() == "second\n"
    assert [p.name for p in target.parent.iterdir()] == ["b.txt"]


def test_layout_keeps_outputs_under_root(tmp_path):
    layout = OutputLayout(tmp_path / "out")
    assert layout.txt_path("d/x y.jpg", Path("/drop/d/x y.jpg")) == tmp_path / "out/labels/d/x y.txt"
    assert layout.annotated_path("d/x.png") == tmp_path / "out/annotated/d/x.jpg"
    for bad in ("../escape.jpg", "/etc/x.jpg", "a/../../b.jpg"):
        with pytest.raises(OutputPathError):
            layout.txt_path(bad, Path("/drop") / bad)
    beside = OutputLayout(tmp_path, beside_images=True)
    assert beside.txt_path("x.jpg", Path("/drop/x.jpg")) == Path("/drop/x.txt")


def test_staging_resume_ignores_torn_line_and_other_fingerprints(tmp_path):
    path = tmp_path / "shard.jsonl"
    w = StagingWriter(path, "fp1", {"model_sha256": "m"})
    assert w.resume() == {}
    w.append({"rel_path": "a.jpg", "status": "ok"})
    w.append({"rel_path": "b\n\"quoted\" é.jpg", "status": "failed", "error": "x"})
    w.close()
    with open(path, "a") as f:
        f.write('{"rel_path": "c.jpg", "sta')  # a write cut by a crash
    again = StagingWriter(path, "fp1", {})
    assert set(again.resume()) == {"a.jpg", "b\n\"quoted\" é.jpg"}
    again.close()
    header, records = read_staging(path)
    assert header["fingerprint"] == "fp1" and len(records) == 2
    other = StagingWriter(path, "fp2", {})
    assert other.resume() == {}  # different model/settings: start over
    other.close()
    assert read_staging(path)[1] == []


def test_reduction_factor():
    assert reduction_factor((12000, 2048), 640) == 8
    assert reduction_factor((2000, 1000), 640) == 2
    assert reduction_factor((3000, 100), 640) == 4
    assert reduction_factor((640, 480), 640) == 1


def test_list_images_rules(tmp_path):
    root = tmp_path / "drop"
    (root / "sub").mkdir(parents=True)
    for rel in ("b.jpg", "A.JPEG", "sub/c.png", "notes.txt", ".hidden.jpg", "sub/new.jpg"):
        (root / rel).write_bytes(b"x")
    (root / "dir.jpg").mkdir()  # a folder named like an image
    (root / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    old = time.time() - 3600
    for rel in ("b.jpg", "A.JPEG", "sub/c.png"):
        os.utime(root / rel, (old, old))
    listing = list_images(root, settle_s=60)
    assert [f.rel_path for f in listing.images] == ["A.JPEG", "b.jpg", "sub/c.png"]
    assert listing.unsettled == ["sub/new.jpg"]
    assert listing.skipped_links == ["link.jpg"]
    with pytest.raises(FileNotFoundError, match="drop folder"):
        list_images(tmp_path / "missing")


def test_synthetic_drop_is_deterministic_with_truth_outside(tmp_path):
    import datetime as dt

    day = dt.date(2026, 1, 2)
    paths = synth.make_drop(tmp_path, day, 2, width=256, height=1500, seed=3)
    assert [p.parent for p in paths] == [tmp_path / "2026-01-02"] * 2
    truth = synth.truth_path(tmp_path, day, paths[0].name)
    assert truth.parent == tmp_path / "ground_truth" / "2026-01-02"
    first = [p.read_bytes() for p in paths], truth.read_text()
    synth.make_drop(tmp_path, day, 2, width=256, height=1500, seed=3)
    assert ([p.read_bytes() for p in paths], truth.read_text()) == first
    boxes = synth.read_labels(truth, 256, 1500)
    assert boxes and all(b.cls in (0, 1) and 0 <= b.x1 < b.x2 <= 256 for b in boxes)


def test_auto_shards_take_any_free_gpu_of_the_host(tmp_path):
    from image_etl.devices import shard_devices

    assert shard_devices("auto", available_gpus=3) == ["cuda", "cuda", "cuda"]
    assert shard_devices("auto", available_gpus=0) == ["cpu"]
    assert shard_devices("1,0", available_gpus=2) == ["cuda:1", "cuda:0"]
    with lease("cuda", lock_dir=tmp_path, local_gpus=2) as first:
        with lease("cuda", lock_dir=tmp_path, local_gpus=2) as second:
            assert {first, second} == {"cuda:0", "cuda:1"}
            with pytest.raises(TimeoutError, match="stayed busy"):
                with lease("cuda", lock_dir=tmp_path, local_gpus=2, timeout_s=0.2, poll_s=0.05):
                    pass
    with pytest.raises(RuntimeError, match="has none visible"):
        with lease("cuda", lock_dir=tmp_path, local_gpus=0):
            pass


def test_results_db_url_from_airflow_connection_fields():
    from image_etl.store import StoreError, redact_url, url_from_connection

    url = url_from_connection("postgres", host="db", port=5432, login="etl", password="s3cr@t/",
                              schema="detections")
    assert url.startswith("postgresql+psycopg2://etl:") and url.endswith("@db:5432/detections")
    assert "s3cr@t/" not in redact_url(url)
    from sqlalchemy.engine import make_url

    assert make_url(url).password == "s3cr@t/"  # special characters survive the round trip
    assert url_from_connection("sqlite", host="/var/lib/results.db") == "sqlite:////var/lib/results.db"
    with pytest.raises(StoreError, match="unsupported connection type 'mysql'"):
        url_from_connection("mysql", host="x")


def test_results_url_is_the_connection_else_the_variable_else_sqlite(monkeypatch, tmp_path):
    """What the DAG, the UI plugin and ``image_etl db`` connect to."""
    import types

    from image_etl.store import results_url

    conn = types.SimpleNamespace(conn_type="postgres", host="db", port=5432, login="etl",
                                 password="pw", schema="detections")
    monkeypatch.setenv("IMAGE_ETL_DB_URL", "sqlite:////elsewhere.db")
    assert results_url(conn) == "postgresql+psycopg2://etl:pw@db:5432/detections"
    assert results_url(None) == "sqlite:////elsewhere.db"
    monkeypatch.delenv("IMAGE_ETL_DB_URL")
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    assert results_url() == f"sqlite:///{tmp_path / 'image_etl_results.db'}"


def test_header_probe_looks_past_large_metadata():
    import io

    from PIL import Image

    from image_etl.decode import _probe

    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(buf, "JPEG", icc_profile=b"\0" * 200_000)
    assert _probe(np.frombuffer(buf.getvalue(), np.uint8)) == ("JPEG", (50, 40), False)
    assert _probe(np.frombuffer(b"hello", np.uint8)) == "not an image (unrecognised header)"


def test_every_runtime_is_one_backend_module_and_the_pipeline_never_names_one():
    """The runtime choice lives in image_etl.backends: each runtime is a module there with the
    same interface, and the forward step and the worker only call that interface."""
    import inspect

    from image_etl import backends, forward, worker

    for runtime in backends.RUNTIMES:
        module = backends.backend_module(runtime)
        assert all(callable(getattr(module, name, None))
                   for name in ("available", "runs_on", "precisions", "load")), runtime
        assert isinstance(module.PACKAGE, str) and isinstance(module.WHERE, str)
        assert "fp32" in module.precisions("cpu")  # every runtime computes in fp32 on a CPU
        loaded = inspect.signature(module.load).return_annotation
        cls = getattr(module, loaded)
        assert cls.runtime == runtime
        assert all(callable(getattr(cls, name, None)) for name in ("infer", "share_cpu", "warmup"))
    for module in (forward, worker):
        code = inspect.getsource(module)
        assert not any(f'"{runtime}"' in code for runtime in backends.RUNTIMES), module.__name__
        assert "runtime ==" not in code and "openvino" not in code, module.__name__
