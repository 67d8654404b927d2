"""Shared pieces of the benchmarks: paths, the benchmark drop, machine description, RSS."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
DATA_DIR = BENCH_DIR / "data"
RESULTS_DIR = BENCH_DIR / "results"
DEMO_MODEL = ROOT / "models" / "demo-yolo11n-2cls.pt"
DROP_DATE = dt.date(2026, 1, 1)
# The post's images are 2-6 MB; synth's default quality 90 lands just above 6 MB at
# 2048 x 12000, quality 85 in the middle of the range (~4.5 MB).
DEFAULT_QUALITY = 85
JPEG_RANGE_MB = (2.0, 6.0)


def default_model() -> Path:
    return DEMO_MODEL


def peak_rss_mb() -> float:
    """This process's peak resident set size.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this process's own memory.
    Not ``ru_maxrss``: that survives fork + exec, so a child spawned by a parent holding 1.2 GB
    reports at least 1.2 GB whatever it used itself (seen here when the parent had just made
    the benchmark drop).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- the benchmark drop -------------------------------------------------------------------

def drop_root(width: int, height: int, quality: int, seed: int) -> Path:
    return DATA_DIR / f"drop-{width}x{height}-q{quality}-s{seed}"


def ensure_drop(count: int, width: int, height: int, quality: int = DEFAULT_QUALITY,
                seed: int = 0, log: Any = print) -> tuple[Path, dict[str, Any]]:
    """The folder of the drop's images (at least ``count`` of them) and its manifest.

    Reused when a manifest with the same size, quality and seed lists at least ``count``
    images that are all still there with their recorded sizes; otherwise (re)made with
    ``image_etl.synth.make_drop`` (deterministic: the same index gives the same image).
    """
    from image_etl import synth

    root = drop_root(width, height, quality, seed)
    manifest_path = root / "drop.json"
    image_dir = root / DROP_DATE.isoformat()
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        files = manifest.get("files", [])
        if len(files) >= count and all((image_dir / f["name"]).is_file()
                                       and (image_dir / f["name"]).stat().st_size == f["bytes"]
                                       for f in files[:count]):
            return image_dir, manifest
    log(f"making the benchmark drop: {count} images of {width} x {height} (JPEG q{quality}) "
        f"under {image_dir} ...")
    paths = synth.make_drop(root, DROP_DATE, count, width=width, height=height, seed=seed,
                            quality=quality, prefix="scan")
    files = [{"name": p.name, "bytes": p.stat().st_size} for p in paths]
    manifest = {"width": width, "height": height, "quality": quality, "seed": seed,
                "date": DROP_DATE.isoformat(), "files": files}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return image_dir, manifest


def drop_stats(manifest: dict[str, Any], count: int) -> dict[str, Any]:
    sizes = [f["bytes"] / 1e6 for f in manifest["files"][:count]]
    lo, hi = JPEG_RANGE_MB
    return {"images": len(sizes), "width": manifest["width"], "height": manifest["height"],
            "quality": manifest["quality"], "mb_min": round(min(sizes), 2),
            "mb_median": round(median(sizes), 2), "mb_max": round(max(sizes), 2),
            "mb_total": round(sum(sizes), 1),
            "in_post_range": all(lo <= s <= hi for s in sizes)}


def drop_tasks(image_dir: Path, count: int) -> list[tuple[Path, str]]:
    """(path, rel_path) for ``count`` images; the drop's files repeat when it has fewer.

    Repeats get their own rel_path (``rep1/scan_00000.jpg``) so every output is distinct.
    """
    files = sorted(image_dir.glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"no .jpg files under {image_dir}")
    tasks = []
    for i in range(count):
        path = files[i % len(files)]
        rep = i // len(files)
        tasks.append((path, path.name if rep == 0 else f"rep{rep}/{path.name}"))
    return tasks


# --- the machine ----------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def usable_cpus() -> int:
    """The cores this process may use (affinity, cgroup quota): the worker's decode threads."""
    from image_etl.resources import cpu_count

    return cpu_count()


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on (CPU, memory, library versions, the device)."""
    import cv2
    import psutil
    import torch
    import ultralytics

    info: dict[str, Any] = {
        "host": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_logical": os.cpu_count(),
        "cpu_usable": usable_cpus(),
        "cpu_physical": psutil.cpu_count(logical=False),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ultralytics": ultralytics.__version__,
        "opencv": cv2.__version__,
        "openvino": _version("openvino"),
        "device": device,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if device.startswith("cuda") or device.isdigit():
        if torch.cuda.is_available():
            index = int(device.split(":")[1]) if ":" in device else int(device) if device.isdigit() else 0
            props = torch.cuda.get_device_properties(index)
            info["gpu"] = props.name
            info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
            info["cuda"] = torch.version.cuda
        else:
            info["gpu"] = "requested, but CUDA is not available"
    return info


def busy_processes(min_cpu_percent: float = 20.0, sample_s: float = 0.5) -> list[str]:
    """Other processes using the CPU right now (their load makes the numbers pessimistic)."""
    import time

    import psutil

    me = os.getpid()
    procs = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        if p.info["pid"] == me:
            continue
        try:
            p.cpu_percent(None)
            procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    time.sleep(sample_s)
    busy = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if pct >= min_cpu_percent:
            cmd = " ".join(p.info.get("cmdline") or [p.info.get("name") or "?"])
            busy.append(f"pid {p.info['pid']} {pct:.0f}% {cmd[:90]}")
    return busy
