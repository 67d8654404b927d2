"""Pipeline benchmark: the post's two designs vs ours, and the machine's limits, side by side.

    .venv/bin/python bench/pipeline_bench.py                 # 144 images, 3 repetitions
    .venv/bin/python bench/pipeline_bench.py --count 6 --reps 1   # quick (~1-2 min)
    .venv/bin/python bench/pipeline_bench.py --device cuda:0 # the same table on a GPU
    .venv/bin/python bench/pipeline_bench.py --memory-check only  # the bounded-memory check

Every variant x repetition runs in a fresh child process (its own warm-up and peak RSS; model
loading and warm-up are outside the timed section) on the same images, model, device and
settings; the order of the variants changes from one repetition to the next. See
bench/README.md for what each variant is and how to read the table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DATA_DIR,
    DEFAULT_QUALITY,
    RESULTS_DIR,
    busy_processes,
    default_model,
    drop_stats,
    drop_tasks,
    ensure_drop,
    machine_info,
    median,
    peak_rss_mb,
)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # seed | ours | limit-decode | limit-model
    design: str = ""  # seeds: original | queue
    fast: bool = False  # reduced-scale JPEG decode
    save: bool = False  # annotated images
    runtime: str = "auto"  # ours / limit-model: auto = OpenVINO on a CPU device, else PyTorch
    precision: str = "auto"  # ours / limit-model: auto = fp16 on CUDA, fp32 on a CPU
    turbojpeg: bool = True  # limit-decode: False decodes every file with cv2.imdecode
    sliced: bool = False  # ours / limit-model: sliced inference (--slice-size, --slice-overlap)
    sahi_batch: int = 1  # sahi: get_sliced_prediction's batch_size
    storage: str = "local"  # s3: the drop (and outputs) on a local SeaweedFS (bench/s3_drop.py)
    ov_mode: str = ""  # OpenVINO: "sync" or "streams" (IMAGE_ETL_OPENVINO_MODE); "": the default
    help: str = ""


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("seed-original", "seed", "original",
            help="post's first script: per-image predict(path) + synchronous txt write"),
    Variant("seed-original+save", "seed", "original", save=True,
            help="the same with save=True (annotated images, as the post ran it)"),
    Variant("seed-queue", "seed", "queue",
            help="post's fix: txt writes through Queue(maxsize=200) + a writer thread"),
    Variant("seed-queue+save", "seed", "queue", save=True,
            help="post's fix with save=True (not in the default set)"),
    Variant("ours-exact", "ours", help="run_shard, exact decode"),
    Variant("ours-exact+save", "ours", save=True, help="run_shard, exact decode, annotated images"),
    Variant("ours-fast", "ours", fast=True, help="run_shard, reduced-scale JPEG decode"),
    Variant("ours-fast+save", "ours", fast=True, save=True,
            help="run_shard, reduced-scale decode, annotated images"),
    Variant("ours-exact-torch", "ours", runtime="torch",
            help="ours-exact with runtime torch (what OpenVINO buys on a CPU device)"),
    Variant("ours-fast-torch", "ours", fast=True, runtime="torch",
            help="ours-fast with runtime torch"),
    Variant("ours-exact-s3", "ours", storage="s3",
            help="ours-exact with the drop read from a local SeaweedFS bucket (read-ahead) and "
                 "the labels and staged rows written back to it, as a fleet runs"),
    Variant("limit-read-s3", "limit-read", storage="s3",
            help="GET every image of the drop from the local SeaweedFS with the worker's "
                 "read-ahead (threads and window as the worker's), no decode"),
    Variant("limit-decode", "limit-decode",
            help="read + exact decode + letterbox on all cores, no model"),
    Variant("limit-decode-opencv", "limit-decode", turbojpeg=False,
            help="limit-decode with cv2.imdecode for every file, as the seeds decode "
                 "(the same pixels; what TurboJPEG buys)"),
    Variant("limit-decode-fast", "limit-decode", fast=True,
            help="read + reduced-scale decode + letterbox on all cores, no model"),
    Variant("limit-model", "limit-model",
            help="forward + NMS on a pre-decoded batch, no I/O, no decode (runtime auto)"),
    Variant("limit-model-torch", "limit-model", runtime="torch",
            help="the same with runtime torch"),
    # Sliced inference (on --sliced-count images: each takes seconds)
    Variant("sahi", "sahi", help="SAHI get_sliced_prediction(path) per image, batch_size 1 "
                                 "(PyTorch, as SAHI runs it)"),
    Variant("sahi-b8", "sahi", sahi_batch=8, help="the same with batch_size 8"),
    Variant("ours-sliced", "ours", sliced=True, help="run_shard, sliced (runtime auto)"),
    Variant("ours-sliced-torch", "ours", sliced=True, runtime="torch",
            help="run_shard, sliced, runtime torch (SAHI's runtime)"),
    Variant("limit-model-sliced", "limit-model", sliced=True,
            help="the forward on a batch of pre-cut slices, no decode (runtime auto)"),
    Variant("limit-model-sliced-torch", "limit-model", sliced=True, runtime="torch",
            help="the same with runtime torch"),
    Variant("ours-sliced-bf16", "ours", sliced=True, precision="bf16",
            help="ours-sliced with precision bf16 (OpenVINO; CPUs with AMX or AVX512-BF16)"),
    Variant("limit-model-sliced-bf16", "limit-model", sliced=True, precision="bf16",
            help="limit-model-sliced with precision bf16"),
)}
# The CPU runtime's two ways side by side (openvino_backend.MODES), whole image and sliced,
# fp32 and bf16: "sync" = one synchronous batched request (LATENCY), "streams" = one request
# per image on single-thread streams (THROUGHPUT), each waited for with a bounded wait_for.
# Asked for by name (not in the default set).
for _mode in ("sync", "streams"):
    for _kind, _base in (("ours", "ours-exact"), ("ours", "ours-sliced"),
                         ("limit-model", "limit-model"), ("limit-model", "limit-model-sliced")):
        for _precision in ("fp32", "bf16"):
            _name = f"{_base}{'-bf16' if _precision == 'bf16' else ''}-ov-{_mode}"
            VARIANTS[_name] = Variant(_name, _kind, runtime="openvino", precision=_precision,
                                      sliced="sliced" in _base, ov_mode=_mode,
                                      help=f"{_base}, OpenVINO {_precision}, mode {_mode}")
# bf16 needs a CPU that computes it, the S3 variants a SeaweedFS: asked for by name, not in
# the default set (nor are the OpenVINO modes above).
DEFAULT_VARIANTS = [name for name in VARIANTS
                    if name != "seed-queue+save" and VARIANTS[name].precision != "bf16"
                    and VARIANTS[name].storage == "local" and not VARIANTS[name].ov_mode]
# The object-storage comparison: each S3 variant beside its local-disk twin.
S3_TWINS = {"ours-exact-s3": "ours-exact"}
BASELINE = "seed-queue"
SLICED_BASELINE = "sahi"


def is_sliced(name: str) -> bool:
    return VARIANTS[name].sliced or VARIANTS[name].kind == "sahi"


def limit_of(variant: Variant, limit: str) -> str:
    """The limit row measured with this variant's runtime, precision and OpenVINO mode."""
    if variant.runtime == "torch":
        return f"{limit}-torch"
    name = f"{limit}-bf16" if variant.precision == "bf16" else limit
    return f"{name}-ov-{variant.ov_mode}" if variant.ov_mode else name


# ================================================================================================
# child side: one variant, one repetition, in a fresh process
# ================================================================================================

def run_child(args: argparse.Namespace) -> dict[str, Any]:
    variant = VARIANTS[args._variant]
    if variant.ov_mode:  # read by openvino_backend when the model is loaded
        os.environ["IMAGE_ETL_OPENVINO_MODE"] = variant.ov_mode
    tasks = drop_tasks(Path(args._drop), args.count)
    out = Path(args._out)
    if variant.kind == "seed":
        result = _child_seed(variant, tasks, out, args)
    elif variant.kind == "sahi":
        result = _child_sahi(variant, tasks, args)
    elif variant.kind == "ours":
        result = _child_ours(variant, tasks, out, args)
    elif variant.kind == "limit-decode":
        result = _child_decode_limit(variant, tasks, args)
    elif variant.kind == "limit-read":
        result = _child_read_limit(tasks)
    else:
        result = _child_model_limit(variant, tasks, args)
    result["variant"] = variant.name
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return result


def _rss_now_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _child_seed(variant: Variant, tasks: list[tuple[Path, str]], out: Path,
                args: argparse.Namespace) -> dict[str, Any]:
    from seed_baselines import SeedRunner

    runner = SeedRunner(Path(args.model), args.device, args.imgsz, args.conf, args.iou,
                        variant.save, out)
    runner.warmup(tasks[0][0])
    shutil.rmtree(out, ignore_errors=True)
    rss_before = _rss_now_mb()
    start = time.time()
    times = runner.run_original(tasks) if variant.design == "original" else runner.run_queue(tasks)
    return {"window_unix": [start, time.time()], "images": times.images, "wall_s": times.wall_s,
            "images_per_s": times.images / times.wall_s, "detections": times.detections,
            "busy": times.busy(), "stages_s": dataclasses.asdict(times),
            "dropped": times.dropped, "rss_before_mb": round(rss_before, 1)}


def _infer_settings(args: argparse.Namespace, fast: bool = False, save: bool = False,
                    runtime: str = "auto", sliced: bool = False, precision: str = "auto") -> Any:
    from image_etl.settings import InferSettings

    slicing = {"slice_size": args.slice_size, "slice_overlap": args.slice_overlap} if sliced else {}
    return InferSettings(imgsz=args.imgsz, conf=args.conf, iou=args.iou, batch_size=args.batch,
                         fast_decode=fast, save_annotated=save, runtime=runtime,
                         precision=precision, progress_every_s=86_400, **slicing)


def _inputs_per_image(args: argparse.Namespace, height: int, width: int) -> int:
    """Model inputs of one image in sliced mode: the slices and the full-image pass."""
    from image_etl.slicing import slice_grid

    n = len(slice_grid(height, width, (args.slice_size, args.slice_size), args.slice_overlap))
    return n + (n > 1)


def _child_sahi(variant: Variant, tasks: list[tuple[Path, str]], args: argparse.Namespace
                ) -> dict[str, Any]:
    """SAHI as its users run it: the image path in (SAHI reads and decodes it), the slice
    boxes and merge of its defaults (greedy NMM, IoS 0.5, the full-image pass)."""
    import cv2
    from sahi import AutoDetectionModel
    from sahi.predict import get_sliced_prediction

    model = AutoDetectionModel.from_pretrained(model_type="ultralytics", model_path=str(args.model),
                                               confidence_threshold=args.conf, device=args.device,
                                               image_size=args.imgsz)

    def predict(path: Path) -> int:
        result = get_sliced_prediction(str(path), model, slice_height=args.slice_size,
                                       slice_width=args.slice_size,
                                       overlap_height_ratio=args.slice_overlap,
                                       overlap_width_ratio=args.slice_overlap,
                                       batch_size=variant.sahi_batch, verbose=0)
        return len(result.object_prediction_list)

    predict(tasks[0][0])  # warm-up
    rss_before = _rss_now_mb()
    start, t0 = time.time(), time.perf_counter()
    detections = sum(predict(path) for path, _ in tasks)
    wall = time.perf_counter() - t0
    h, w = cv2.imread(str(tasks[0][0]), cv2.IMREAD_REDUCED_GRAYSCALE_8).shape[:2]
    return {"window_unix": [start, time.time()], "images": len(tasks), "wall_s": wall,
            "images_per_s": len(tasks) / wall, "detections": detections,
            "inputs_per_image": _inputs_per_image(args, h * 8, w * 8),
            "busy": {"decode": 0.0, "infer": 1.0, "write": 0.0}, "stages_s": {},
            "rss_before_mb": round(rss_before, 1), "runtime": "torch"}


def _child_ours(variant: Variant, tasks: list[tuple[Path, str]], out: Path,
                args: argparse.Namespace) -> dict[str, Any]:
    from image_etl.model import load_model
    from image_etl.output_paths import OutputLayout
    from image_etl.worker import ImageTask, run_shard

    model = load_model(args.model, args.device, imgsz=args.imgsz, runtime=variant.runtime,
                       precision=variant.precision)
    settings = _infer_settings(args, variant.fast, variant.save, variant.runtime, variant.sliced,
                               variant.precision)
    if variant.storage == "s3":
        return _child_ours_s3(variant, tasks, model, settings, args)
    shard = [ImageTask(path, rel) for path, rel in tasks]
    # Warm-up on one batch (the timed pass's batch shape; one image holds many slices),
    # outputs thrown away.
    run_shard(shard[:1 if variant.sliced else args.batch], model, settings,
              OutputLayout(out / "warmup"))
    shutil.rmtree(out, ignore_errors=True)
    rss_before = _rss_now_mb()
    run_dir = out / "run"
    run_dir.mkdir(parents=True)
    cpu = CpuProbe(None)
    start, t0 = time.time(), time.perf_counter()
    report = run_shard(shard, model, settings, OutputLayout(run_dir),
                       staging_path=run_dir / "staging.jsonl")
    wall = time.perf_counter() - t0
    window = [start, time.time()]
    return _ours_result(variant, report, len(shard), wall, window, rss_before, model, args,
                        shard[0].path, cpu.done())


def _ours_result(variant: Variant, report: Any, images: int, wall: float, window: list[float],
                 rss_before: float, model: Any, args: argparse.Namespace, first: Path,
                 cpu: dict[str, float]) -> dict[str, Any]:
    if report.failed or report.processed != images:
        raise RuntimeError(f"{variant.name}: {report.failed} failed, {report.processed} of "
                           f"{images} processed: {report.failures[:3]}")
    info = report.to_dict()
    return {"window_unix": window, "images": report.processed, "wall_s": wall,
            "images_per_s": report.processed / wall,
            "detections": report.detections, "busy": info["busy"],
            "stages_s": {"shard_wall_s": report.wall_s, "decode_s": report.decode_s,
                         "infer_s": report.infer_s, "write_s": report.write_s,
                         "decode_threads": report.decode_threads,
                         "batch_size": report.batch_size},
            **({"inputs_per_image": _inputs_per_image(args, *_image_hw(first))}
               if variant.sliced else {}),
            "cpu_s": cpu, "rss_before_mb": round(rss_before, 1), "runtime": model.runtime}


class CpuProbe:
    """CPU seconds over a timed section: this process (all threads: decode, forward, the S3
    client's threads) and, for the S3 variants, the SeaweedFS server (from /proc)."""

    def __init__(self, server_pid: int | None) -> None:
        from s3_drop import own_cpu_s, process_cpu_s

        self.server_pid = server_pid
        self.client0 = own_cpu_s()
        self.server0 = process_cpu_s(server_pid) if server_pid else None

    def done(self) -> dict[str, float]:
        from s3_drop import own_cpu_s, process_cpu_s

        out = {"client": round(own_cpu_s() - self.client0, 3)}
        if self.server_pid and self.server0 is not None:
            out["server"] = round(process_cpu_s(self.server_pid) - self.server0, 3)
        return out


def _child_ours_s3(variant: Variant, tasks: list[tuple[Path, str]], model: Any, settings: Any,
                   args: argparse.Namespace) -> dict[str, Any]:
    """run_shard as a fleet's worker runs it: the images read from the bucket (read-ahead), the
    labels and the staged rows (periodic PUTs of the staging object) written to the bucket."""
    import uuid

    from s3_drop import child_info, storage_options

    from image_etl.sink import StagingObject
    from image_etl.storage import open_storage
    from image_etl.worker import ImageTask, run_shard

    info = child_info()
    options = storage_options(info)
    source = open_storage(f"s3://{info['bucket']}/{info['prefix']}", options)
    out = open_storage(f"s3://{info['bucket']}/out-{uuid.uuid4().hex[:8]}", options)
    shard = [ImageTask(None, rel) for _, rel in tasks]
    try:
        run_shard(shard[:1 if variant.sliced else args.batch], model, settings,
                  out.child("warmup"), source=source)
        rss_before = _rss_now_mb()
        run = out.child("run")
        cpu = CpuProbe(info["pid"])
        start, t0 = time.time(), time.perf_counter()
        report = run_shard(shard, model, settings, run,
                           staging_path=StagingObject(run, "staging.jsonl"), source=source)
        wall = time.perf_counter() - t0
        window = [start, time.time()]
        used = cpu.done()
    finally:
        out.remove_tree()
    return _ours_result(variant, report, len(shard), wall, window, rss_before, model, args,
                        tasks[0][0], used)


def _child_read_limit(tasks: list[tuple[Path, str]]) -> dict[str, Any]:
    """Every object GET through the worker's read-ahead, bytes dropped: what the storage and
    its client cost with no decode beside them."""
    from s3_drop import child_info, storage_options

    from image_etl import worker
    from image_etl.resources import cpu_count
    from image_etl.storage import open_storage, read_ahead

    info = child_info()
    source = open_storage(f"s3://{info['bucket']}/{info['prefix']}", storage_options(info))
    rels = [rel for _, rel in tasks]
    source.read_bytes(rels[0])  # warm-up: the client's session and connection
    rss_before = _rss_now_mb()
    cpu = CpuProbe(info["pid"])
    start, t0 = time.time(), time.perf_counter()
    total = 0
    threads, window = worker.read_concurrency(cpu_count())  # the worker's decode threads
    for _, data in read_ahead(source.read_bytes, rels, threads=threads, window=window):
        if isinstance(data, Exception):
            raise data
        total += len(data)
    wall = time.perf_counter() - t0
    used = cpu.done()
    return {"window_unix": [start, time.time()], "images": len(rels), "wall_s": wall,
            "images_per_s": len(rels) / wall, "mb_per_s": total / 2**20 / wall,
            "busy": {"decode": 0.0, "infer": 0.0, "write": 0.0},
            "stages_s": {"threads": threads, "window": window},
            "cpu_s": used, "rss_before_mb": round(rss_before, 1)}


def _image_hw(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.height, im.width


def _child_decode_limit(variant: Variant, tasks: list[tuple[Path, str]],
                        args: argparse.Namespace) -> dict[str, Any]:
    from image_etl.decode import Decoder
    from image_etl.model import load_model

    model = load_model(args.model, "cpu", warmup=False)  # only for its stride
    decoder = Decoder(args.imgsz, model.stride, fast=variant.fast, turbojpeg=variant.turbojpeg)
    del model
    from image_etl.resources import cpu_count

    threads = cpu_count()  # every core this process may use, as the worker's default

    def one(i: int) -> tuple[float, str | None]:
        path, rel = tasks[i]
        item = decoder(i, path, rel)
        return item.seconds, item.error

    one(0)  # warm-up: first use of the decoder and the letterbox
    rss_before = _rss_now_mb()
    cpu = CpuProbe(None)
    start, t0 = time.time(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        done = list(pool.map(one, range(len(tasks))))
    wall = time.perf_counter() - t0
    used = cpu.done()
    window = [start, time.time()]
    errors = [e for _, e in done if e]
    if errors:
        raise RuntimeError(f"decode errors: {errors[:3]}")
    decode_s = sum(s for s, _ in done)
    return {"window_unix": window, "images": len(tasks), "wall_s": wall,
            "images_per_s": len(tasks) / wall,
            "busy": {"decode": decode_s / wall / threads, "infer": 0.0, "write": 0.0},
            "stages_s": {"decode_s": decode_s, "threads": threads,
                         "per_image_decode_ms": 1e3 * decode_s / len(tasks)},
            "cpu_s": used, "rss_before_mb": round(rss_before, 1)}


def _child_model_limit(variant: Variant, tasks: list[tuple[Path, str]],
                       args: argparse.Namespace) -> dict[str, Any]:
    from image_etl.decode import Decoder
    from image_etl.forward import detect_batch
    from image_etl.model import load_model

    model = load_model(args.model, args.device, imgsz=args.imgsz, runtime=variant.runtime,
                       precision=variant.precision)
    settings = _infer_settings(args, sliced=variant.sliced)
    if variant.sliced:  # a batch of the first image's slices, cut as the worker cuts them
        from image_etl.plans import SlicedPlan

        decoder = Decoder(args.imgsz, model.stride, keep_image=True)
        item = decoder(0, *tasks[0])
        plan = SlicedPlan(settings, (args.imgsz, args.imgsz), model.stride)
        units = plan.inputs(item)
        batch = [units[i % (len(units) - 1)] for i in range(args.batch)]
        per_image = len(units)
    else:
        decoder = Decoder(args.imgsz, model.stride)
        picked = [tasks[i % len(tasks)] for i in range(args.batch)]
        batch = [decoder(i, path, rel) for i, (path, rel) in enumerate(picked)]
        per_image = 1
    errors = [b.error for b in batch if getattr(b, "error", None)]
    if errors:
        raise RuntimeError(f"decode errors: {errors}")
    # The engine's own batch step (stack → device → forward → NMS → scale → one .cpu()).
    def infer() -> list:
        return detect_batch(model, batch, settings.conf, settings.iou, settings.max_det)

    infer()  # warm-up
    rss_before = _rss_now_mb()
    iterations = 0
    start, t0 = time.time(), time.perf_counter()
    while True:
        dets = infer()
        iterations += 1
        wall = time.perf_counter() - t0
        if wall >= args.model_seconds and iterations >= 3:
            break
    images = iterations * len(batch) / per_image
    return {"window_unix": [start, time.time()], "images": images, "wall_s": wall,
            "images_per_s": images / wall, "inputs_per_image": per_image,
            "detections": sum(len(d) for d in dets),
            "busy": {"decode": 0.0, "infer": 1.0, "write": 0.0},
            "stages_s": {"iterations": iterations, "batch": len(batch),
                         "per_batch_ms": 1e3 * wall / iterations,
                         "input_shape": list(batch[0].input.shape)},
            "rss_before_mb": round(rss_before, 1), "runtime": model.runtime}


# ================================================================================================
# parent side: the drop, the schedule, the table, the JSON, the chart
# ================================================================================================

def _child_command(args: argparse.Namespace, variant: str, count: int, drop: Path, out: Path,
                   result: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--_variant", variant,
            "--_result", str(result), "--_drop", str(drop), "--_out", str(out),
            "--count", str(count), "--model", str(args.model), "--device", args.device,
            "--imgsz", str(args.imgsz), "--conf", str(args.conf), "--iou", str(args.iou),
            "--batch", str(args.batch), "--model-seconds", str(args.model_seconds),
            "--slice-size", str(args.slice_size), "--slice-overlap", str(args.slice_overlap)]


def _client_affinity(server_core: int | None) -> Callable[[], None] | None:
    """With --server-core: the child runs on every core but the server's (the engine sizes its
    threads from its affinity mask)."""
    if server_core is None:
        return None
    cores = os.sched_getaffinity(0) - {server_core}
    return lambda: os.sched_setaffinity(0, cores)


def run_variant(args: argparse.Namespace, variant: str, count: int, drop: Path) -> dict[str, Any]:
    """One fresh child process for ``variant``; its result, or an ``error``."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-", dir=DATA_DIR))
    result_file = scratch / "result.json"
    out = scratch / "out"
    started = time.perf_counter()
    try:
        proc = subprocess.run(_child_command(args, variant, count, drop, out, result_file),
                              capture_output=True, text=True, timeout=args.child_timeout,
                              env={**os.environ, "YOLO_OFFLINE": "1"},
                              preexec_fn=_client_affinity(args.server_core))
        if proc.returncode != 0 or not result_file.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
            return {"variant": variant, "error": f"exit {proc.returncode}: " + "\n".join(tail)}
        result = json.loads(result_file.read_text())
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"timed out after {args.child_timeout}s"}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # outputs are cleared between runs
    result["process_s"] = round(time.perf_counter() - started, 1)
    return result


def schedule(variants: list[str], reps: int) -> list[list[str]]:
    """Each repetition's order: rotated by an even share of the list, every other one reversed,
    so no variant always runs first, last or right after the same neighbour."""
    n = len(variants)
    orders = []
    for r in range(reps):
        shift = (r * n) // max(reps, 1)
        order = variants[shift:] + variants[:shift]
        orders.append(order[::-1] if r % 2 else order)
    return orders


def summarise(runs: list[dict[str, Any]], variants: list[str], device: str = "cpu"
              ) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for name in variants:
        ok = [r for r in runs if r["variant"] == name and "error" not in r]
        if not ok:
            continue
        ips = [r["images_per_s"] for r in ok]
        summary[name] = {
            "runs": len(ok), "images": ok[0]["images"],
            "images_per_s": median(ips), "min": min(ips), "max": max(ips),
            "wall_s": median([r["wall_s"] for r in ok]),
            "busy": {k: median([r["busy"][k] for r in ok]) for k in ("decode", "infer", "write")},
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
            "detections": ok[0].get("detections"),
            "dropped": sum(r.get("dropped", 0) for r in ok),
            "runtime": ok[0].get("runtime"),
            "inputs_per_image": ok[0].get("inputs_per_image"),
            **_cost_per_image(ok),
        }
    base = summary.get(BASELINE, {}).get("images_per_s")
    sahi = summary.get(SLICED_BASELINE, {}).get("images_per_s")
    for name, s in summary.items():
        variant = VARIANTS[name]
        if is_sliced(name):
            s["slices_per_s"] = s["images_per_s"] * (s["inputs_per_image"] or 1)
            s["ratio_vs_sahi"] = s["images_per_s"] / sahi if sahi else None
            limit = summary.get(limit_of(variant, "limit-model-sliced"), {}).get("images_per_s")
            if variant.kind == "ours" and limit:
                s["pct_of_sliced_limit"] = 100 * s["images_per_s"] / limit
            continue
        s["ratio_vs_baseline"] = s["images_per_s"] / base if base else None
        limit_name = "limit-decode-fast" if variant.fast else "limit-decode"
        limit = summary.get(limit_name, {}).get("images_per_s")
        if variant.kind in ("seed", "ours") and limit:
            s["pct_of_decode_limit"] = 100 * s["images_per_s"] / limit
            s["decode_limit"] = limit_name
        exact_limit = summary.get("limit-decode", {}).get("images_per_s")
        if variant.kind in ("seed", "ours") and exact_limit:
            s["pct_of_exact_decode_limit"] = 100 * s["images_per_s"] / exact_limit
        pipe = pipeline_limit(summary, variant, device)
        if variant.kind == "ours" and pipe:
            s["pipeline_limit"] = pipe
            s["pct_of_pipeline_limit"] = 100 * s["images_per_s"] / pipe
        twin = S3_TWINS.get(name)
        if twin and summary.get(twin, {}).get("images_per_s"):
            s["pct_of_local"] = 100 * s["images_per_s"] / summary[twin]["images_per_s"]
        if twin and s.get("client_cpu_ms") and summary.get(twin, {}).get("client_cpu_ms"):
            # CPU per image, this process and the server together: on a CPU-bound machine
            # the throughput ratio it predicts does not move with what else runs there.
            s["pct_of_local_cpu"] = 100 * summary[twin]["client_cpu_ms"] / (
                s["client_cpu_ms"] + s.get("server_cpu_ms", 0.0))
    return summary


def _cost_per_image(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians per image: CPU of this process and of the S3 server, and (ours) the decode and
    forward time, in milliseconds."""
    out: dict[str, float] = {}
    per = {"client_cpu_ms": lambda r: r.get("cpu_s", {}).get("client"),
           "server_cpu_ms": lambda r: r.get("cpu_s", {}).get("server"),
           "decode_ms": lambda r: r.get("stages_s", {}).get("decode_s"),
           "forward_ms": lambda r: r.get("stages_s", {}).get("infer_s")}
    for key, get in per.items():
        values = [1e3 * get(r) / r["images"] for r in runs if get(r) is not None and r["images"]]
        if values:
            out[key] = round(median(values), 2)
    return out


def storage_table(summary: dict[str, dict[str, Any]]) -> str:
    """The object-storage rows beside their local-disk twins, and where the time goes."""
    head = (f"{'variant':<16} {'img/s':>7} {'min-max':>13} {'% local':>8} {'% local CPU':>11} "
            f"{'client CPU':>11} {'weed CPU':>9} {'decode':>7} {'forward':>8}")
    lines = [head, f"{'':<58}{'ms per image (median)':>45}", "-" * len(head)]
    names = [n for pair in S3_TWINS.items() for n in pair[::-1]] + ["limit-read-s3",
                                                                    "limit-decode"]
    for name in names:
        s = summary.get(name)
        if s is None:
            continue
        lines.append(
            f"{name:<16} {s['images_per_s']:>7.2f} {s['min']:>6.2f}-{s['max']:<6.2f} "
            f"{_fmt(s.get('pct_of_local'), '.0f', '%'):>8} "
            f"{_fmt(s.get('pct_of_local_cpu'), '.0f', '%'):>11} "
            f"{_fmt(s.get('client_cpu_ms'), '.1f'):>11} "
            f"{_fmt(s.get('server_cpu_ms'), '.1f'):>9} {_fmt(s.get('decode_ms'), '.1f'):>7} "
            f"{_fmt(s.get('forward_ms'), '.1f'):>8}")
    return "\n".join(lines)


def pipeline_limit(summary: dict[str, dict[str, Any]], variant: Variant, device: str
                   ) -> float | None:
    """The most a pipeline of this variant's decode and forward pass can do here, from the
    limits measured in the same run. On a CPU device both share the cores, so their times per
    image add up: 1 / (1/decode + 1/model). On a GPU they overlap: the slower one bounds."""
    decode = summary.get("limit-decode-fast" if variant.fast else "limit-decode", {})
    model = summary.get(limit_of(variant, "limit-model"), {})
    if not decode.get("images_per_s") or not model.get("images_per_s"):
        return None
    a, b = decode["images_per_s"], model["images_per_s"]
    return 1 / (1 / a + 1 / b) if device == "cpu" else min(a, b)


def _ratio(summary: dict[str, dict[str, Any]], a: str, b: str) -> float | None:
    if a in summary and b in summary and summary[b]["images_per_s"]:
        return summary[a]["images_per_s"] / summary[b]["images_per_s"]
    return None


def targets(summary: dict[str, dict[str, Any]], memory: list[dict[str, Any]],
            server_core: int | None = None) -> list[dict[str, Any]]:
    """The issue's targets, each PASS / MISS / n/a (variant not run)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: float, unit: str, higher: bool = True) -> None:
        if value is None:
            status = "n/a"
        else:
            status = "PASS" if (value >= goal if higher else value <= goal) else "MISS"
        out.append({"target": name, "value": value, "goal": goal, "unit": unit, "status": status})

    add("ours-exact >= 2.5x seed-queue", _ratio(summary, "ours-exact", BASELINE), 2.5, "x")
    server = ("sharing the cores" if server_core is None
              else f"alone on core {server_core}, the variants on the others")
    add(f"ours-exact-s3 >= 90% of ours-exact (the drop in a local SeaweedFS {server})",
        summary.get("ours-exact-s3", {}).get("pct_of_local"), 90.0, "%")
    add("ours-exact-s3 CPU per image (with the server's) within 90% of ours-exact's",
        summary.get("ours-exact-s3", {}).get("pct_of_local_cpu"), 90.0, "%")
    for name in ("ours-exact", "ours-fast"):
        add(f"{name} >= 90% of the pipeline limit",
            summary.get(name, {}).get("pct_of_pipeline_limit"), 90.0, "%")
    exact = summary.get("ours-exact", {}).get("pct_of_exact_decode_limit")
    add("ours-exact >= 85% of the decode limit", exact, 85.0, "%")
    add("ours-exact+save >= 3x seed-original+save",
        _ratio(summary, "ours-exact+save", "seed-original+save"), 3.0, "x")
    add("ours-fast+save >= 3x seed-original+save (informational)",
        _ratio(summary, "ours-fast+save", "seed-original+save"), 3.0, "x")
    best_sahi = max((summary[n]["images_per_s"] for n in summary if VARIANTS[n].kind == "sahi"),
                    default=None)
    ours_sliced = summary.get("ours-sliced", {}).get("images_per_s")
    add("ours-sliced >= 3x sahi (its faster batch size)",
        ours_sliced / best_sahi if ours_sliced and best_sahi else None, 3.0, "x")
    add("ours-sliced >= 90% of limit-model-sliced",
        summary.get("ours-sliced", {}).get("pct_of_sliced_limit"), 90.0, "%")
    for check in memory:
        counts = check["runs"]
        add(f"{check['variant']} peak RSS at {counts[-1]['count']} images within 15% of "
            f"{counts[0]['count']}", check.get("growth_pct"), 15.0, "%", higher=False)
    return out


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def sliced_table(summary: dict[str, dict[str, Any]], variants: list[str]) -> str:
    head = (f"{'variant':<26} {'img/s':>7} {'min-max':>13} {'slices/s':>9} {'x sahi':>8} "
            f"{'% limit':>8} {'peak RSS MB':>11}")
    lines = [head, "-" * len(head)]
    for name in variants:
        s = summary.get(name)
        if s is None:
            lines.append(f"{name:<26} {'(failed)':>7}")
            continue
        lines.append(f"{name:<26} {s['images_per_s']:>7.3f} {s['min']:>6.3f}-{s['max']:<6.3f} "
                     f"{s['slices_per_s']:>9.1f} {_fmt(s.get('ratio_vs_sahi'), '.2f', 'x'):>8} "
                     f"{_fmt(s.get('pct_of_sliced_limit'), '.0f', '%'):>8} "
                     f"{s['peak_rss_mb']:>11.0f}")
    return "\n".join(lines)


def table(summary: dict[str, dict[str, Any]], variants: list[str]) -> str:
    head = (f"{'variant':<20} {'img/s':>7} {'min-max':>13} {'x ' + BASELINE:>13} "
            f"{'% dec.limit':>11} {'% pipe.limit':>12}  {'busy dec/inf/wrt':>17} "
            f"{'peak RSS MB':>11}")
    lines = [head, "-" * len(head)]
    for name in variants:
        s = summary.get(name)
        if s is None:
            lines.append(f"{name:<20} {'(failed)':>7}")
            continue
        b = s["busy"]
        pct = s.get("pct_of_decode_limit")
        pct_txt = "-" if pct is None else f"{pct:.0f}%" + (" (f)" if VARIANTS[name].fast else "")
        lines.append(
            f"{name:<20} {s['images_per_s']:>7.2f} {s['min']:>6.2f}-{s['max']:<6.2f} "
            f"{_fmt(s['ratio_vs_baseline'], '.2f', 'x'):>13} {pct_txt:>11} "
            f"{_fmt(s.get('pct_of_pipeline_limit'), '.0f', '%'):>12}  "
            f"{b['decode']:>5.2f}/{b['infer']:.2f}/{b['write']:.2f} {s['peak_rss_mb']:>11.0f}")
    return "\n".join(lines)


def chart(path: Path, summary: dict[str, dict[str, Any]], variants: list[str],
          title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in variants if n in summary][::-1]
    values = [summary[n]["images_per_s"] for n in names]
    lo = [summary[n]["images_per_s"] - summary[n]["min"] for n in names]
    hi = [summary[n]["max"] - summary[n]["images_per_s"] for n in names]
    colors = {"seed": "#9e9e9e", "ours": "#1f77b4", "limit-decode": "#ff7f0e",
              "limit-model": "#2ca02c", "limit-read": "#9467bd"}
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(names) + 1.8))
    bars = ax.barh(names, values, xerr=[lo, hi], capsize=3,
                   color=[colors[VARIANTS[n].kind] for n in names])
    for bar, n in zip(bars, names):
        if VARIANTS[n].kind.startswith("limit"):
            bar.set_hatch("//")
        ratio = summary[n].get("ratio_vs_baseline")
        label = f" {summary[n]['images_per_s']:.2f} img/s"
        if ratio is not None and not VARIANTS[n].kind.startswith("limit"):
            label += f"  {ratio:.2f}x"
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, label, va="center",
                fontsize=8)
    ax.set_xlabel(f"images/s (median; whiskers min-max; ratios vs {BASELINE})")
    ax.set_xlim(0, max(values) * 1.35 if values else 1)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def memory_check(args: argparse.Namespace, variant: str, drop: Path, available: int
                 ) -> dict[str, Any]:
    counts = args.memory_counts
    runs = []
    for count in counts:
        note = f" (the drop's {available} files repeated)" if count > available else ""
        print(f"  memory check: {variant} on {count} images{note} ...", flush=True)
        r = run_variant(args, variant, count, drop)
        if "error" in r:
            print(f"    failed: {r['error']}")
        else:
            print(f"    peak RSS {r['peak_rss_mb']:.0f} MB (before the timed pass "
                  f"{r['rss_before_mb']:.0f} MB), {r['images_per_s']:.2f} img/s")
        runs.append({"count": count, **r})
    ok = [r for r in runs if "error" not in r]
    result: dict[str, Any] = {"variant": variant, "drop_images": available,
                              "repeated": any(c > available for c in counts), "runs": runs}
    if len(ok) == len(runs) and len(ok) >= 2:
        first, last = ok[0]["peak_rss_mb"], ok[-1]["peak_rss_mb"]
        result["growth_pct"] = 100 * (last - first) / first
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # 144 images: each variant's timed section lasts several seconds here (48 gave 1-2 s
    # runs, too short to be stable).
    p.add_argument("--count", type=int, default=144, help="images per run (default 144)")
    p.add_argument("--size", default="2048x12000", help="WIDTHxHEIGHT of the drop's images")
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality of the drop")
    p.add_argument("--seed", type=int, default=0, help="drop seed")
    p.add_argument("--reps", type=int, default=3, help="repetitions (median reported)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma list from: {', '.join(VARIANTS)}")
    p.add_argument("--model", type=Path, default=None,
                   help="Ultralytics .pt (default: models/demo-yolo11n-2cls.pt)")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--imgsz", type=int, default=None, help="default: the model's training size")
    p.add_argument("--conf", type=float, default=0.25)
    p.add_argument("--iou", type=float, default=0.7)
    p.add_argument("--batch", type=int, default=8, help="ours: batch size")
    p.add_argument("--model-seconds", type=float, default=3.0,
                   help="limit-model: time the forward loop for at least this long")
    p.add_argument("--memory-check", choices=("auto", "yes", "no", "only"), default="auto",
                   help="peak RSS of --memory-variant at --memory-counts images; auto: with full-size "
                        "runs (--count >= 48), not with quick ones; only: nothing else")
    p.add_argument("--memory-counts", default="50,200", help="image counts of the memory check")
    p.add_argument("--memory-variants", default="ours-exact,ours-sliced",
                   help="the variants the memory check runs, comma-separated")
    p.add_argument("--sliced-count", type=int, default=8,
                   help="images per run of the sliced variants (each takes seconds)")
    p.add_argument("--slice-size", type=int, default=640, help="sliced variants: slice size")
    p.add_argument("--slice-overlap", type=float, default=0.2, help="sliced variants: overlap")
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="where JSON + PNG go")
    p.add_argument("--child-timeout", type=int, default=3600, help="seconds per child run")
    p.add_argument("--server-core", type=int, default=None,
                   help="S3 variants: pin SeaweedFS to this core and every variant (local ones "
                        "too) to the other cores, as on a fleet whose bucket is another machine; "
                        "default: all share every core")
    # internal: the child process side
    p.add_argument("--_variant", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    p.add_argument("--_drop", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device.isdigit():
        args.device = f"cuda:{args.device}"
    if args.model is None:
        args.model = default_model()
    args.model = args.model.resolve()
    args.memory_variants = [v for v in args.memory_variants.split(",") if v]
    unknown = [v for v in args.variants.split(",") + args.memory_variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if args.count < 1 or args.reps < 1:
        p.error("--count and --reps must be at least 1")
    try:
        args.width, args.height = (int(v) for v in args.size.lower().split("x"))
        args.memory_counts = [int(c) for c in args.memory_counts.split(",")]
    except ValueError:
        p.error(f"--size must be WIDTHxHEIGHT and --memory-counts a comma list of numbers, got "
                f"{args.size!r} and {args.memory_counts!r}")
    return args


def _run_all(args: argparse.Namespace, orders: list[list[str]], drop: Path, total: int
             ) -> list[dict[str, Any]]:
    runs = []
    k = 0
    for rep, order in enumerate(orders, 1):
        for name in order:
            k += 1
            r = run_variant(args, name, args.sliced_count if is_sliced(name) else args.count, drop)
            r["rep"] = rep
            runs.append(r)
            if "error" in r:
                print(f"[{k}/{total}] rep {rep} {name}: FAILED\n{r['error']}", flush=True)
            else:
                print(f"[{k}/{total}] rep {rep} {name:<20} {r['images_per_s']:7.2f} img/s  "
                      f"wall {r['wall_s']:6.1f}s  peak RSS {r['peak_rss_mb']:6.0f} MB", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._variant:
        result = run_child(args)
        Path(args._result).write_text(json.dumps(result))
        return 0

    if not args.model.is_file():
        print(f"error: model weights not found: {args.model}", file=sys.stderr)
        return 2
    if args.device != "cpu":
        import torch

        if not args.device.startswith("cuda:") or not torch.cuda.is_available():
            print(f"error: device {args.device!r}: use cpu or cuda:N on a machine with CUDA "
                  f"(CUDA available here: {torch.cuda.is_available()})", file=sys.stderr)
            return 2
    from image_etl.model import read_model_info

    names, default_imgsz = read_model_info(args.model)
    args.imgsz = args.imgsz or default_imgsz
    width, height = args.width, args.height
    drop, manifest = ensure_drop(args.count, width, height, args.quality, args.seed)
    stats = drop_stats(manifest, args.count)
    machine = machine_info(args.device)
    others = busy_processes()
    variants = [] if args.memory_check == "only" else args.variants.split(",")
    run_memory = args.memory_check in ("yes", "only") or (args.memory_check == "auto"
                                                           and args.count >= 48)

    print(f"machine: {machine['cpu']}, {machine['cpu_logical']} logical cores, "
          f"{machine['ram_gb']} GB RAM, torch {machine['torch']}, device {args.device}"
          + (f" ({machine['gpu']})" if "gpu" in machine else ""))
    print(f"model: {args.model} (imgsz {args.imgsz}, classes {names}); conf {args.conf}, "
          f"iou {args.iou}, batch {args.batch} (ours)")
    print(f"drop: {stats['images']} x {stats['width']}x{stats['height']} JPEG q{stats['quality']}, "
          f"{stats['mb_min']}-{stats['mb_max']} MB each (median {stats['mb_median']})"
          + ("" if stats["in_post_range"] else "  WARNING: outside the post's 2-6 MB"))
    if others:
        print("WARNING: other processes are using the CPU; numbers will be pessimistic and noisy:")
        for line in others:
            print(f"  {line}")

    runs: list[dict[str, Any]] = []
    orders = schedule(variants, args.reps)
    started = dt.datetime.now(dt.UTC)
    total = sum(len(o) for o in orders)
    server = contextlib.ExitStack()
    # The server's drop: as many images as the largest S3 run asks for, memory check included.
    s3_counts = [args.sliced_count if is_sliced(v) else args.count for v in variants
                 if VARIANTS[v].storage == "s3"]
    s3_counts += [max(args.memory_counts) for v in args.memory_variants
                  if run_memory and VARIANTS[v].storage == "s3"]
    if s3_counts:
        from s3_drop import s3_drop

        count = max(s3_counts)
        print(f"object storage: starting SeaweedFS (weed mini) and uploading {count} images ...",
              flush=True)
        info = server.enter_context(s3_drop(drop_tasks(drop, count), args.server_core))
        print(f"object storage: {info['endpoint_url']} bucket {info['bucket']}, weed pid "
              f"{info['pid']}" + ("" if args.server_core is None else
                                  f", on core {args.server_core} alone (the variants on the "
                                  "others)"), flush=True)
    with server:
        runs += _run_all(args, orders, drop, total)
        memory = [memory_check(args, v, drop, len(list(drop.glob("*.jpg"))))
                  for v in args.memory_variants] if run_memory else []

    summary = summarise(runs, variants, args.device)
    goals = targets(summary, memory, args.server_core)
    finished = dt.datetime.now(dt.UTC)
    machine["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    machine["server_core"] = args.server_core

    print()
    whole = [v for v in variants if not is_sliced(v)]
    sliced = [v for v in variants if is_sliced(v)]
    if whole:
        print(f"{args.count} images, {args.reps} repetition(s), device {args.device}, medians:")
        print(table(summary, whole))
        print("  % dec.limit: vs limit-decode (exact) or, for (f) fast variants, vs "
              "limit-decode-fast; busy: fraction of the wall time each stage was working")
    if any(VARIANTS[v].storage == "s3" for v in variants):
        where = ("on every core with the variants" if args.server_core is None else
                 f"alone on core {args.server_core}, the variants on the others")
        print(f"\nobject storage (a local SeaweedFS, weed mini, {where}) beside the local disk, "
              f"load average {machine.get('load_avg_1m', '?')} at the start, "
              f"{os.getloadavg()[0]:.2f} at the end:")
        print(storage_table(summary))
        print("  client CPU: this process (decode, forward, the S3 client's threads); weed CPU: "
              "the server's /proc time in the same window; per image. % local CPU: the local "
              "run's CPU per image / (client + weed CPU per image)")
    if sliced:
        print(f"\nsliced: {args.sliced_count} images, {args.slice_size} px slices, overlap "
              f"{args.slice_overlap}, {args.reps} repetition(s), medians:")
        print(sliced_table(summary, sliced))
        print("  slices/s: model inputs per second (the slices and the full-image pass); "
              "% limit: vs limit-model-sliced of the same runtime")
    for check in memory:
        print(f"memory check ({check['variant']}):", ", ".join(
            f"{r['count']} images {r['peak_rss_mb']:.0f} MB" for r in check["runs"] if "error" not in r)
            + (f"; growth {check['growth_pct']:+.1f}%" if "growth_pct" in check else "")
            + (f" (the drop's {check['drop_images']} files repeated to reach "
               f"{max(args.memory_counts)})" if check["repeated"] else ""))
    print("targets:")
    for g in goals:
        value = "-" if g["value"] is None else f"{g['value']:.2f}{g['unit']}"
        print(f"  {g['status']:<4}  {g['target']:<58} {value}")
    dropped = {n: s["dropped"] for n, s in summary.items() if s.get("dropped")}
    if dropped:
        print(f"WARNING: the post's put(timeout=0.1) would have lost results: {dropped}")

    args.results.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    json_path = args.results / f"pipeline-{stamp}.json"
    png_path = args.results / f"pipeline-{stamp}.png"
    report = {
        "started": started.isoformat(), "finished": finished.isoformat(),
        "command": [sys.executable, *sys.argv], "machine": machine, "other_cpu_load": others,
        "settings": {"model": str(args.model), "imgsz": args.imgsz, "conf": args.conf,
                     "iou": args.iou, "batch": args.batch, "device": args.device,
                     "count": args.count, "reps": args.reps, "model_seconds": args.model_seconds,
                     "sliced_count": args.sliced_count, "slice_size": args.slice_size,
                     "slice_overlap": args.slice_overlap},
        "drop": {"dir": str(drop), **stats}, "variants": {n: VARIANTS[n].help for n in variants},
        "orders": orders, "runs": runs, "summary": summary, "memory_check": memory,
        "targets": goals,
    }
    json_path.write_text(json.dumps(report, indent=2))
    if summary:
        chart(png_path, summary, [v for v in variants if not is_sliced(v)],
              f"{args.count} x {width}x{height} JPEG, {args.model.name}, imgsz {args.imgsz}, "
              f"{args.device} | {machine['cpu']} x{machine['cpu_logical']}"
              + (f" | {machine['gpu']}" if "gpu" in machine else ""))
        print(f"wrote {json_path} and {png_path}")
    else:
        print(f"wrote {json_path}")
    failed = [r for r in runs if "error" in r] + [r for c in memory for r in c["runs"]
                                                  if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
