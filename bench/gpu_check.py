"""One prepared check of the CUDA path, for a GPU owner with a fresh machine and this repo.

    python3 bench/gpu_check.py              # on the GPU machine: cuda:0, planned for < 8 min
    python3 bench/gpu_check.py --dry-run    # the same steps on the CPU, small counts (~1 min)

Steps (each reported ok / FAILED / skipped, with why; a failed step makes the exit status 1
and names itself, and the steps that do not need it still run):

    install      carried wheels (.whl/*.whl) into --site when .whl/ exists, then an import
                 check of everything the engine, the bench and pytest need (and CUDA)
    parity-fp16  tests/test_worker.py's parity test with model.predict on the device, fp16
    parity-fp32  the same in fp32 (--parity-device / --parity-precision of tests/conftest.py)
    demo-drop    `python -m image_etl make-drop`: the demo's synthetic drop
    infer-exact  `python -m image_etl infer --device cuda:0` over it (exact decode)
    infer-fast   the same with --fast-decode
    lease        two concurrent shards on `cuda`, one GPU: one must wait, neither shares it
    bench-drop   the benchmark's drop (made in the background while the steps above run)
    bench        bench/pipeline_bench.py rows seed-queue, ours-exact, ours-fast, limit-decode,
                 limit-model (decode threads = all cores)
    gpu-util     nvidia-smi samples (utilization.gpu, memory.used, every 200 ms) inside the
                 timed sections of ours-exact (and of the other rows)
    summary      summary.md: the table for bench/README.md, the target
                 "ours-exact >= 90 % of min(limit-decode, limit-model)" and the ratio to seed-queue

Everything goes to one folder (--out, else $OUT when set, else
bench/results/gpu-check-<UTC time>/): gpu-check.log, gpu-check.json, summary.md,
nvidia-smi.csv, and the bench's pipeline-<time>.json + .png (6 files: the device tool brings
back at most 8). Scratch files (the demo drop, outputs, locks) go to a temporary folder,
removed at the end unless --keep-work; the wheels are installed into --site; the bench's drop
is bench/data/ as for `make bench` (reused when it is there).

--dry-run runs the same steps on `cpu` with small counts: parity in fp32 only (fp16 runs on
CUDA only), runtime torch (what a GPU runs; no OpenVINO export), the lease over a pretend
single GPU (local_gpus=1) with the shards' model on the CPU, and no nvidia-smi (the
gpu-util step says so). tests/test_gpu_check.py runs it so that the script does not rot.

This file imports only the standard library at the top: the packages it checks may not be
installed until its install step has run. Heavy work runs in child processes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MODEL = ROOT / "models" / "demo-yolo11n-2cls.pt"
DEMO_DATE = "2026-11-20"
# Each step and the steps it needs (in order; the summary reports whatever ran).
NEEDS: dict[str, tuple[str, ...]] = {
    "install": (), "parity-fp16": ("install",), "parity-fp32": ("install",),
    "demo-drop": ("install",), "infer-exact": ("demo-drop",), "infer-fast": ("demo-drop",),
    "lease": ("demo-drop",), "bench-drop": ("install",), "bench": ("bench-drop",),
    "gpu-util": ("bench",), "summary": ()}
STEPS = tuple(NEEDS)
ROWS = ("seed-queue", "ours-exact", "ours-fast", "limit-decode", "limit-model")
# On a CPU, runtime auto would mean OpenVINO; the dry run runs what a GPU runs (PyTorch).
DRY_VARIANTS = {"ours-exact": "ours-exact-torch", "ours-fast": "ours-fast-torch",
                "limit-model": "limit-model-torch"}
TARGET_PCT = 90.0
# What the engine, the bench and the tests import (module, distribution for the message).
NEEDED = [("torch", "torch"), ("torchvision", "torchvision"), ("numpy", "numpy"),
          ("cv2", "opencv-python-headless"), ("ultralytics", "ultralytics-opencv-headless"),
          ("simplejpeg", "simplejpeg"), ("yaml", "pyyaml"), ("PIL", "pillow"),
          ("psutil", "psutil"), ("matplotlib", "matplotlib"), ("pytest", "pytest")]
OK, FAILED, SKIPPED = "ok", "FAILED", "skipped"


class StepError(RuntimeError):
    """A check inside a step did not hold; the message says which and what was seen."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise StepError(message)


# ================================================================================================
# running things: one log, child processes with timeouts, steps that report
# ================================================================================================

class Child:
    """A child process in its own process group (so that stopping it stops what it started;
    still in our session, so whoever ends our session ends it too); its output goes to the
    log, line by line."""

    def __init__(self, check: Check, tag: str, cmd: list[str], env: dict[str, str] | None = None,
                 stdout_file: Path | None = None, shown: str | None = None) -> None:
        self.check, self.tag, self.cmd = check, tag, cmd
        self.lines: list[str] = []
        self.rc: int | None = None
        check.log(f"  [{tag}] $ {shown or ' '.join(cmd)}")
        self.sink = open(stdout_file, "w") if stdout_file else None  # noqa: SIM115 - closed in wait
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env or check.env, process_group=0, text=True,
            errors="replace", stdout=self.sink or subprocess.PIPE,
            stderr=subprocess.STDOUT)
        check.children.append(self)
        self.pump = threading.Thread(target=self._pump, daemon=True)
        if self.sink is None:
            self.pump.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            self.check.log(f"  [{self.tag}] {line}")

    def stop(self, first: signal.Signals = signal.SIGTERM) -> None:
        """End it (``first``, then SIGKILL), with everything it started."""
        for sig, wait_s in ((first, 5), (signal.SIGKILL, 5)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue

    def wait(self, timeout_s: float) -> int:
        """The exit status; raises StepError (after ending it) past ``timeout_s`` or the
        check's deadline, whichever comes first."""
        limit = min(timeout_s, max(self.check.left(), 1.0))
        try:
            rc = self.proc.wait(limit)
        except subprocess.TimeoutExpired:
            self.stop()
            self._drain()
            why = ("" if limit == timeout_s else
                   f" (the check's --deadline-s {self.check.args.deadline_s}s was reached)")
            raise StepError(f"{self.tag}: still running after {limit:.0f}s{why}; ended") from None
        except BaseException:  # a signal: stop it now rather than wait for its output to end
            self.stop()
            raise
        self._drain()
        self.rc = rc
        return rc

    def _drain(self) -> None:
        """The rest of its output (it has exited or been stopped)."""
        if self.pump.is_alive():
            self.pump.join(10)
        if self.sink and not self.sink.closed:
            self.sink.close()

    @property
    def exited(self) -> str:
        """``exited N``, with its last line of output when N is not 0 (usually the error)."""
        last = next((line.strip() for line in reversed(self.lines) if line.strip()), "")
        return f"exited {self.rc}" + (f" ({last[:300]})" if self.rc and last else "")


class Step:
    def __init__(self, name: str) -> None:
        self.name = name
        self.status = "pending"
        self.seconds = 0.0
        self.detail = ""  # one line: what it showed
        self.notes: list[str] = []  # what was left out or worth knowing
        self.data: dict[str, Any] = {}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "seconds": round(self.seconds, 1),
                "detail": self.detail, "notes": self.notes, "data": self.data}


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = dt.datetime.now(dt.UTC)
        self.t0 = time.monotonic()
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.log_file = open(self.out / "gpu-check.log", "w")  # noqa: SIM115 - closed in close()
        self.lock = threading.Lock()
        self.steps: dict[str, Step] = {}
        self.children: list[Child] = []
        self.env = self._child_env()

    def _child_env(self) -> dict[str, str]:
        paths = [str(ROOT / "include")]
        if os.environ.get("PYTHONPATH"):
            paths.append(os.environ["PYTHONPATH"])
        return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "YOLO_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
                "YOLO_CONFIG_DIR": str(self.work / "ultralytics"),
                "IMAGE_ETL_CACHE_DIR": str(self.work / "cache")}

    def log(self, message: str) -> None:
        with self.lock:
            print(message, flush=True)
            self.log_file.write(message + "\n")
            self.log_file.flush()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        """Seconds before the deadline, less what the summary needs."""
        return self.args.deadline_s - self.elapsed() - 10

    def run(self, name: str, fn: Callable[[Step], None], needs: tuple[str, ...] = (),
            skip: str | None = None) -> Step:
        """Run one step: ok, FAILED (with the reason), or skipped (with the reason)."""
        step = Step(name)
        self.steps[name] = step
        missing = [n for n in needs if self.steps.get(n) is None or self.steps[n].status != OK]
        if skip or missing:
            step.status = SKIPPED
            step.detail = skip or "needs " + ", ".join(
                f"{n} ({self.steps[n].status if n in self.steps else 'not run'})" for n in missing)
            self.log(f"== {name}: skipped: {step.detail}")
            self.save()
            return step
        self.log(f"== {name} (at {self.elapsed():.0f}s)")
        t0 = time.monotonic()
        try:
            if name != "summary" and self.left() < 5:
                raise StepError(f"not started: the check's --deadline-s {self.args.deadline_s}s "
                                f"is spent ({self.elapsed():.0f}s gone)")
            fn(step)
            step.status = OK
        except StepError as exc:
            step.status, step.detail = FAILED, str(exc)
        except Exception as exc:  # noqa: BLE001 - a bug in the step is a failed step, reported
            step.status, step.detail = FAILED, f"{type(exc).__name__}: {exc}"
            self.log(traceback.format_exc().rstrip())
        step.seconds = time.monotonic() - t0
        for note in step.notes:
            self.log(f"   note: {note}")
        self.log(f"== {name}: {step.status} in {step.seconds:.1f}s: {step.detail}")
        self.save()
        return step

    def python(self, tag: str, args: list[str], timeout_s: float, shown: str | None = None) -> Child:
        child = Child(self, tag, [sys.executable, *args],
                      shown=f"{sys.executable} {shown}" if shown else None)
        child.wait(timeout_s)
        return child

    def save(self) -> None:
        """gpu-check.json after every step, so a run cut short still leaves its results."""
        failed = [s.name for s in self.steps.values() if s.status == FAILED]
        report = {"started": self.started.isoformat(), "elapsed_s": round(self.elapsed(), 1),
                  "budget_s": self.args.budget_s, "dry_run": self.args.dry_run,
                  "device": self.args.device, "command": [sys.executable, *sys.argv],
                  "settings": {k: str(v) if isinstance(v, Path) else v
                               for k, v in vars(self.args).items() if not k.startswith("_")},
                  "failed": failed, "steps": [s.to_dict() for s in self.steps.values()]}
        (self.out / "gpu-check.json").write_text(json.dumps(report, indent=2))

    def stop_children(self) -> None:
        for child in self.children:
            if child.proc.poll() is None:
                self.log(f"  [{child.tag}] still running: stopped")
                child.stop()

    def close(self) -> None:
        self.log_file.close()
        if not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)


# ================================================================================================
# the steps
# ================================================================================================

IMPORT_CHECK = """
import importlib, json, os, sys
out = {"python": sys.version.split()[0], "executable": sys.executable, "cpu_count": os.cpu_count()}
missing = []
for module, dist in NEEDED:
    try:
        m = importlib.import_module(module)
        out[module] = getattr(m, "__version__", "?")
        out[module + "_file"] = getattr(m, "__file__", None)
    except Exception as exc:
        missing.append(f"{module} ({dist}): {type(exc).__name__}: {exc}")
out["missing"] = missing
if "torch" in out:
    import torch
    out["cuda_available"] = torch.cuda.is_available()
    out["cuda"] = torch.version.cuda
    out["gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(out["gpus"])]
print("IMPORTS " + json.dumps(out))
""".replace("NEEDED", repr(NEEDED))


def step_install(check: Check, step: Step) -> None:
    args = check.args
    wheels = sorted(args.wheels.glob("*.whl")) if args.wheels.is_dir() else []
    if not wheels:
        step.notes.append(f"no wheels under {args.wheels}: using the packages installed here")
    elif args.dry_run:
        step.notes.append(f"dry run: the {len(wheels)} wheel(s) under {args.wheels} were not "
                          "installed (they are for the GPU machine's Python)")
    else:
        args.site.mkdir(parents=True, exist_ok=True)
        child = check.python("pip", ["-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                     "--no-compile", "--no-cache-dir", "--upgrade", "--target",
                                     str(args.site), *map(str, wheels)], args.timeout_install)
        expect(child.rc == 0, f"pip install of {len(wheels)} wheel(s) from {args.wheels} "
                              f"{child.exited}")
        step.data["installed"] = [w.name for w in wheels]
        # First on every child's path: the carried versions win over any the machine has.
        check.env["PYTHONPATH"] = os.pathsep.join([str(args.site), check.env["PYTHONPATH"]])
        step.notes.append(f"installed {len(wheels)} wheel(s) into {args.site}: "
                          + ", ".join(w.name.split("-")[0] + " " + w.name.split("-")[1]
                                      for w in wheels))
    child = check.python("imports", ["-c", IMPORT_CHECK], 120,
                         shown="-c <import " + ", ".join(m for m, _ in NEEDED) + ">")
    found = [line for line in child.lines if line.startswith("IMPORTS ")]
    expect(child.rc == 0 and bool(found), f"the import check {child.exited}")
    info = json.loads(found[-1].removeprefix("IMPORTS "))
    step.data.update(info)
    expect(not info["missing"], "cannot import: " + "; ".join(info["missing"]))
    if not args.dry_run:
        expect(info.get("cuda_available"), f"torch {info.get('torch')} sees no CUDA device "
                                           "(torch.cuda.is_available() is False)")
        index = int(args.device.split(":")[1])
        expect(info["gpus"] > index, f"{args.device} asked for, {info['gpus']} GPU(s) visible")
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        step.data["nvidia_smi_L"] = smi.stdout.strip()
        check.log(f"  [nvidia-smi -L] {smi.stdout.strip()}")
    gpus = ", ".join(info.get("gpu_names") or []) or "none"
    step.detail = (f"python {info['python']}, torch {info['torch']} (CUDA {info.get('cuda')}), "
                   f"ultralytics {info['ultralytics']}, simplejpeg {info['simplejpeg']}, "
                   f"opencv {info['cv2']}, numpy {info['numpy']}, {info['cpu_count']} cores, "
                   f"GPUs: {gpus}")


def step_parity(check: Check, step: Step, precision: str) -> None:
    args = check.args
    xml = check.work / f"parity-{precision}.xml"
    child = check.python(step.name, [
        "-m", "pytest", "tests/test_worker.py", "-k", "test_exact_mode_equals_model_predict",
        "--parity-device", args.device, "--parity-precision", precision, "-q", "-s",
        "-p", "no:cacheprovider", f"--junitxml={xml}"], args.timeout_parity)
    expect(xml.is_file(), f"pytest {child.exited} and wrote no report")
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    step.data.update(counts, rc=child.rc)
    printed = [line for line in child.lines if "parity on" in line]
    step.data["printed"] = printed
    problems = [f"{case.get('name')}: {(bad.get('message') or bad.tag)[:300]}"
                for case in suite.iter("testcase") for bad in case
                if bad.tag in ("failure", "error", "skipped")]
    expect(child.rc == 0 and counts["tests"] == 1 and not problems,
           f"pytest exited {child.rc}, {counts}: " + "; ".join(problems))
    step.detail = printed[-1].strip() if printed else "1 passed"


def step_demo_drop(check: Check, step: Step) -> None:
    args = check.args
    root = check.work / "demo"
    child = check.python(step.name, ["-m", "image_etl", "make-drop", str(root), "--date",
                                     DEMO_DATE, "--count", str(args.demo_count), "--size",
                                     args.demo_size], args.timeout_step)
    images = sorted((root / DEMO_DATE).glob("*.jpg"))
    expect(child.rc == 0 and len(images) == args.demo_count,
           f"make-drop {child.exited}, {len(images)} of {args.demo_count} images")
    step.data.update(dir=str(root / DEMO_DATE), images=len(images),
                     mb=round(sum(p.stat().st_size for p in images) / 1e6, 1))
    step.detail = f"{len(images)} x {args.demo_size} JPEGs, {step.data['mb']} MB"


def _truth_boxes(path: Path, width: int, height: int) -> list[tuple[int, list[float]]]:
    boxes = []
    for line in path.read_text().split("\n"):
        if line.strip():
            c, xc, yc, w, h = line.split()[:5]
            xc, yc, w, h = float(xc) * width, float(yc) * height, float(w) * width, float(h) * height
            boxes.append((int(c), [xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2]))
    return boxes


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0


def accuracy(staging: Path, truth_dir: Path) -> dict[str, Any]:
    """Recall and precision at IoU 0.5 (class-aware, greedy) against synth's ground truth."""
    tp = n_pred = n_true = 0
    for line in staging.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "header":
            continue
        truth = _truth_boxes(truth_dir / (Path(rec["rel_path"]).stem + ".txt"), rec["width"],
                             rec["height"])
        used: set[int] = set()
        for det in rec["detections"]:
            best, best_j = 0.5, None
            for j, (cls, box) in enumerate(truth):
                if j not in used and cls == int(det[0]) and (v := _iou(det[2:6], box)) >= best:
                    best, best_j = v, j
            if best_j is not None:
                used.add(best_j)
                tp += 1
        n_pred += len(rec["detections"])
        n_true += len(truth)
    return {"recall": round(tp / max(n_true, 1), 3), "precision": round(tp / max(n_pred, 1), 3),
            "objects": n_true}


def step_infer(check: Check, step: Step, fast: bool) -> None:
    args = check.args
    images = Path(check.steps["demo-drop"].data["dir"])
    out = check.work / step.name
    summary_path, staging = out / "summary.json", out / "staging.jsonl"
    cmd = ["-m", "image_etl", "infer", str(images), "--out", str(out), "--model", str(args.model),
           "--device", args.device, "--batch", str(args.batch), "--summary", str(summary_path),
           "--staging", str(staging)]
    if fast:
        cmd.append("--fast-decode")
    if args.dry_run:
        cmd += ["--runtime", "torch"]
    child = check.python(step.name, cmd, args.timeout_step)
    expect(child.rc == 0 and summary_path.is_file(),
           f"python -m image_etl infer {child.exited}" + ("" if summary_path.is_file()
                                                           else ", no summary written"))
    s = json.loads(summary_path.read_text())
    labels = sorted((out / "labels").rglob("*.txt"))
    n = args.demo_count
    step.data.update({k: s.get(k) for k in ("device", "processed", "ok", "failed", "detections",
                                            "images_per_s", "decode_threads", "busy")})
    expect(s.get("device") == args.device, f"ran on {s.get('device')!r}, not {args.device!r}")
    expect(s["processed"] == n and s["ok"] == n and s["failed"] == 0,
           f"{s['processed']} processed, {s['ok']} ok, {s['failed']} failed of {n}: "
           f"{s.get('failures', [])[:3]}")
    expect(len(labels) == n, f"{len(labels)} txt files for {n} images")
    expect(s["detections"] > 0, "no detections at all on the demo drop")
    expect(s["settings"]["fast_decode"] is fast, f"fast_decode {s['settings']['fast_decode']}")
    acc = accuracy(staging, images.parent / "ground_truth" / images.name)
    step.data["accuracy"] = acc
    step.detail = (f"{n} images on {s['device']}, {s['detections']} detections, recall "
                   f"{acc['recall']} precision {acc['precision']} vs ground truth "
                   f"({acc['objects']} objects), {s['images_per_s']:.1f} img/s (not a benchmark: "
                   "the bench drop is being made beside it)")


def step_lease(check: Check, step: Step) -> None:
    args = check.args
    images = sorted(Path(check.steps["demo-drop"].data["dir"]).glob("*.jpg"))
    expect(len(images) >= 2, f"{len(images)} demo image(s); the lease step needs 2")
    lease_dir = check.work / "lease"
    (lease_dir / "locks").mkdir(parents=True)
    children = []
    for k in range(2):
        shard = lease_dir / f"shard-{k}.txt"
        shard.write_text("\n".join(str(p) for p in images[k::2]))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_lease-child", str(k),
               "--_lease-dir", str(lease_dir), "--model", str(args.model),
               "--batch", str(args.batch)]
        if args.dry_run:
            cmd.append("--dry-run")
        children.append(Child(check, f"lease-{k}", cmd))
    try:
        rcs = [c.wait(args.timeout_step) for c in children]
    finally:  # one timed out: the other goes too, before the next step starts
        for c in children:
            c.stop()
    results = []
    for k, (c, rc) in enumerate(zip(children, rcs)):
        path = lease_dir / f"result-{k}.json"
        expect(rc == 0 and path.is_file(), f"shard {k} {c.exited}" +
               ("" if path.is_file() else " without a result"))
        r = json.loads(path.read_text())
        r["waited"] = any("waiting for" in line for line in c.lines)
        r["leased_logged"] = any("leased" in line and "image_etl.devices" in line for line in c.lines)
        results.append(r)
    step.data["shards"] = results
    for r in results:
        expect(r["leased_logged"], f"shard {r['shard']}: no 'leased' line from devices.lease")
        expect(r["processed"] == r["images"] and r["failed"] == 0,
               f"shard {r['shard']}: {r['processed']} of {r['images']} processed, "
               f"{r['failed']} failed")
        expect(not r["cuda_initialized_at_lease"],
               f"shard {r['shard']} had a CUDA context before it held the lease")
        if not args.dry_run:
            expect(r["model_device"] == r["device"],
                   f"shard {r['shard']} leased {r['device']} but ran on {r['model_device']}")
    a, b = sorted(results, key=lambda r: r["t_leased"])
    overlap = a["t_released"] > b["t_leased"]
    expect(not (overlap and a["device"] == b["device"]),
           f"both shards held {a['device']} at once ({a['t_leased']:.2f}-{a['t_released']:.2f} "
           f"and {b['t_leased']:.2f}-{b['t_released']:.2f})")
    gpus = a["local_gpus"]
    if gpus == 1:
        expect(a["device"] == b["device"], f"one GPU, but leased {a['device']} and {b['device']}")
        expect(b["waited"] and not a["waited"],
               f"one GPU: exactly the second shard must log 'waiting for' (first waited: "
               f"{a['waited']}, second: {b['waited']})")
        wait_s = b["t_leased"] - b["t_ready"]
        step.detail = (f"shard {b['shard']} waited {wait_s:.1f}s for {a['device']} until shard "
                       f"{a['shard']} released it ({a['t_released'] - a['t_leased']:.1f}s held); "
                       "held intervals do not overlap")
    else:
        step.notes.append(f"{gpus} GPUs visible: each shard should take its own, without waiting")
        expect(a["device"] != b["device"], f"{gpus} GPUs, but both shards leased {a['device']}")
        step.detail = f"{gpus} GPUs: shards took {a['device']} and {b['device']}"
    if args.dry_run:
        step.notes.append("dry run: the lease ran over a pretend single GPU (local_gpus=1); "
                          "the shards' model ran on the CPU")


def lease_child(args: argparse.Namespace) -> int:
    """One shard: lease `cuda`, hold it until the other shard is queued behind it, run."""
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from image_etl.devices import lease
    from image_etl.model import load_model
    from image_etl.output_paths import OutputLayout
    from image_etl.settings import InferSettings
    from image_etl.worker import ImageTask, run_shard

    k, lease_dir = args._lease_child, Path(args._lease_dir)
    paths = [Path(p) for p in (lease_dir / f"shard-{k}.txt").read_text().split("\n") if p]
    local_gpus = 1 if args.dry_run else torch.cuda.device_count()
    result: dict[str, Any] = {"shard": k, "pid": os.getpid(), "images": len(paths),
                              "local_gpus": local_gpus, "t_ready": time.time()}
    (lease_dir / f"ready-{k}").touch()
    with lease("cuda", lock_dir=lease_dir / "locks", timeout_s=120, poll_s=0.1,
               local_gpus=1 if args.dry_run else None) as device:
        result["t_leased"] = time.time()
        result["device"] = device
        result["cuda_initialized_at_lease"] = torch.cuda.is_initialized()
        # Hold the GPU until the other shard is queued on it, so that with one GPU one of
        # the two must wait (without this a fast first shard could finish before the other
        # even asks).
        deadline = time.monotonic() + 120
        while not all((lease_dir / f"ready-{j}").exists() for j in range(2)):
            if time.monotonic() > deadline:
                raise TimeoutError("the other shard never got ready")
            time.sleep(0.05)
        time.sleep(1.0)  # it polls every 0.1 s: by now it has asked, found it busy, and said so
        model = load_model(args.model, "cpu" if args.dry_run else device, runtime="torch")
        result["model_device"] = str(model.device)
        report = run_shard([ImageTask(p, p.name) for p in paths], model,
                           InferSettings(batch_size=args.batch), OutputLayout(lease_dir / f"out-{k}"))
        if model.is_cuda:
            torch.cuda.synchronize(model.device)
            result["max_memory_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        result.update(processed=report.processed, failed=report.failed,
                      detections=report.detections, t_released=time.time())
    (lease_dir / f"result-{k}.json").write_text(json.dumps(result))
    return 0


def start_bench_drop(check: Check) -> Child | None:
    """The benchmark's drop is made (or found) in the background: ~1 s per full-size image."""
    args = check.args
    width, height = args.bench_size.split("x")
    code = ("import sys; sys.path.insert(0, 'bench'); from common import ensure_drop, drop_stats; "
            f"d, m = ensure_drop({args.count}, {width}, {height}); "
            f"import json; print('BENCH_DROP', json.dumps({{'dir': str(d), **drop_stats(m, {args.count})}}))")
    check.log(f"== bench-drop: started in the background ({args.count} x {args.bench_size})")
    return Child(check, "bench-drop", [sys.executable, "-c", code],
                 shown=f"{sys.executable} -c <bench/common.py ensure_drop({args.count}, {width}, "
                       f"{height})>")


def step_bench_drop(check: Check, step: Step, child: Child | None) -> None:
    expect(child is not None, "was not started")
    assert child is not None
    rc = child.wait(check.args.timeout_bench_drop)
    found = [line for line in child.lines if line.startswith("BENCH_DROP ")]
    expect(rc == 0 and bool(found), f"making the bench drop {child.exited}")
    d = json.loads(found[-1].removeprefix("BENCH_DROP "))
    step.data.update(d)
    step.detail = (f"{d['images']} x {d['width']}x{d['height']} JPEG q{d['quality']}, "
                   f"{d['mb_min']}-{d['mb_max']} MB each, under {d['dir']}")


class Sampler:
    """nvidia-smi every 200 ms: timestamp, utilization.gpu, memory.used, into nvidia-smi.csv."""

    def __init__(self, check: Check, index: int) -> None:
        self.path = check.out / "nvidia-smi.csv"
        self.t_start = time.time()
        self.period_s = check.args.sample_ms / 1000
        cmd = ["nvidia-smi", f"--id={index}", "--query-gpu=timestamp,utilization.gpu,memory.used",
               "--format=csv,noheader,nounits", f"--loop-ms={check.args.sample_ms}"]
        # Into a file nvidia-smi's stdout is block-buffered: line-buffer it, or the last
        # few seconds of samples could die with it.
        if shutil.which("stdbuf"):
            cmd = ["stdbuf", "-oL", *cmd]
        else:
            check.log("   note: no stdbuf here: the last samples may be lost when nvidia-smi stops")
        self.child = Child(check, "nvidia-smi", cmd, stdout_file=self.path)

    def stop(self) -> list[tuple[float, float, float]]:
        """Ends nvidia-smi; (unix time, util %, memory MiB) per sample."""
        time.sleep(2 * self.period_s)
        self.child.stop(signal.SIGINT)  # as Ctrl-C: nvidia-smi's own way out of the loop
        self.child.wait(10)
        samples = []
        for line in self.path.read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 3:
                continue
            try:
                when = dt.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                samples.append((when, float(parts[1]), float(parts[2])))
            except ValueError:
                continue
        if samples:
            # nvidia-smi prints local time; a time zone that Python reads differently would
            # shift every sample by whole quarter hours: put the first sample back at the start.
            offset = samples[0][0] - self.t_start
            if abs(offset) > 60:
                shift = round(offset / 900) * 900
                samples = [(t - shift, u, m) for t, u, m in samples]
        return samples


def step_bench(check: Check, step: Step) -> None:
    args = check.args
    variants = [DRY_VARIANTS.get(r, r) if args.dry_run else r for r in ROWS]
    step.data["variants"] = dict(zip(ROWS, variants))
    before = set(check.out.glob("pipeline-*.json"))
    sampler = None
    if args.nvidia_smi == "no":
        step.notes.append("dry run: nvidia-smi not sampled" if args.dry_run
                          else "--nvidia-smi no: not sampled")
    elif shutil.which("nvidia-smi"):
        sampler = Sampler(check, int(args.device.split(":")[1]) if ":" in args.device else 0)
    else:
        step.notes.append("nvidia-smi not found: no GPU utilisation samples")
    try:
        child = check.python(step.name, [
            str(BENCH / "pipeline_bench.py"), "--device", args.device, "--count", str(args.count),
            "--size", args.bench_size, "--reps", str(args.reps), "--variants", ",".join(variants),
            "--batch", str(args.batch), "--model", str(args.model), "--model-seconds",
            str(args.model_seconds), "--memory-check", "no", "--results", str(check.out),
            "--child-timeout", str(args.timeout_bench)], args.timeout_bench)
    finally:
        samples = sampler.stop() if sampler else None
    step.data["samples"] = samples
    new = sorted(set(check.out.glob("pipeline-*.json")) - before)
    expect(bool(new), f"pipeline_bench.py {child.exited} and wrote no JSON")
    bench = json.loads(new[-1].read_text())
    step.data["json"] = new[-1].name
    step.data["machine"] = bench["machine"]
    step.data["drop"] = bench["drop"]
    step.data["summary"] = bench["summary"]
    step.data["runs"] = bench["runs"]
    errors = [f"{r['variant']}: {r['error'].splitlines()[-1] if r['error'] else '?'}"
              for r in bench["runs"] if "error" in r]
    missing = [v for v in variants if v not in bench["summary"]]
    cores = bench["machine"].get("cpu_usable") or bench["machine"]["cpu_logical"]
    threads = {}
    for row, v in zip(ROWS, variants):
        ok = [r for r in bench["runs"] if r["variant"] == v and "error" not in r]
        if row in ("ours-exact", "ours-fast"):
            threads[row] = sorted({r["stages_s"]["decode_threads"] for r in ok})
        elif row == "limit-decode":
            threads[row] = sorted({r["stages_s"]["threads"] for r in ok})
    step.data["decode_threads"] = threads
    step.data["cores"] = cores
    expect(child.rc == 0 and not errors and not missing,
           f"pipeline_bench.py exited {child.rc}; failed runs: {errors or 'none'}; rows "
           f"without a result: {missing or 'none'}")
    wrong = {row: t for row, t in threads.items() if t != [cores]}
    expect(not wrong, f"decode threads {wrong}, not all {cores} usable cores")
    s = bench["summary"]
    step.detail = ", ".join(f"{row} {s[v]['images_per_s']:.2f}" for row, v in zip(ROWS, variants)) \
        + f" img/s; decode threads {cores} (all cores)"


def window_stats(samples: list[tuple[float, float, float]], runs: list[dict[str, Any]]
                 ) -> dict[str, Any] | None:
    inside = [(u, m) for r in runs if "window_unix" in r
              for t, u, m in samples if r["window_unix"][0] <= t <= r["window_unix"][1]]
    if not inside:
        return None
    util = [u for u, _ in inside]
    return {"samples": len(inside), "util_mean": round(statistics.mean(util), 1),
            "util_max": max(util), "memory_max_mib": max(m for _, m in inside),
            "timed_s": round(sum(r["window_unix"][1] - r["window_unix"][0] for r in runs), 2)}


def step_gpu_util(check: Check, step: Step) -> None:
    bench = check.steps["bench"].data
    samples = bench.get("samples")
    expect(samples is not None and len(samples) > 0, "no nvidia-smi samples"
           + (": " + "; ".join(check.steps["bench"].notes) if check.steps["bench"].notes else ""))
    per_row = {}
    for row, v in bench["variants"].items():
        runs = [r for r in bench["runs"] if r["variant"] == v and "error" not in r]
        per_row[row] = window_stats(samples, runs)
    step.data.update(per_row=per_row, samples=len(samples))
    exact = per_row.get("ours-exact")
    expect(exact is not None, f"none of the {len(samples)} samples fell inside ours-exact's "
                              "timed sections (too short for the sampling period?)")
    step.detail = (f"ours-exact: GPU busy {exact['util_mean']:.0f}% mean, {exact['util_max']:.0f}% "
                   f"max, memory.used max {exact['memory_max_mib']:.0f} MiB ({exact['samples']} "
                   f"samples over {exact['timed_s']}s timed)")


# ================================================================================================
# the summary
# ================================================================================================

def _f(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def target(summary: dict[str, Any], variants: dict[str, str]) -> dict[str, Any]:
    get = {row: summary.get(v, {}).get("images_per_s") for row, v in variants.items()}
    limits = [get["limit-decode"], get["limit-model"]]
    out: dict[str, Any] = {"goal_pct": TARGET_PCT, "images_per_s": get}
    if None in limits or get["ours-exact"] is None:
        out["status"] = "n/a"
        return out
    bound = min(limits)
    out.update(bound=bound, bound_by="limit-decode" if limits[0] <= limits[1] else "limit-model",
               pct=100 * get["ours-exact"] / bound)
    out["status"] = "PASS" if out["pct"] >= TARGET_PCT else "MISS"
    base = get["seed-queue"]
    out["exact_vs_seed_queue"] = get["ours-exact"] / base if base else None
    out["fast_vs_seed_queue"] = get["ours-fast"] / base if base and get["ours-fast"] else None
    return out


def git_commit(given: str | None) -> str:
    """The commit checked: --commit, else git's, else unknown (the device tool sends no .git)."""
    if given:
        return given
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (with local changes)" if dirty else "") if out.returncode == 0 \
            else "unknown (no git here)"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git here)"


def write_summary(check: Check, step: Step) -> None:
    args, steps = check.args, check.steps
    bench = steps["bench"].data if "bench" in steps else {}
    machine = bench.get("machine") or {}
    summary = bench.get("summary") or {}
    variants = bench.get("variants") or {r: r for r in ROWS}
    util = (steps["gpu-util"].data.get("per_row") if "gpu-util" in steps else None) or {}
    goal = target(summary, variants)
    step.data["target"] = goal
    env = steps["install"].data if "install" in steps else {}
    gpu = machine.get("gpu") or ", ".join(env.get("gpu_names") or []) or "cpu (dry run)"
    date = check.started.strftime("%Y-%m-%d")
    lines = []
    if args.dry_run:
        lines += ["> **DRY RUN on the CPU** (`--dry-run`): small counts, not a GPU measurement. "
                  "Do not paste these numbers into bench/README.md.", ""]
    lines += [f"#### {gpu}, {date}", "",
              f"`{' '.join(['python3', 'bench/gpu_check.py', *sys.argv[1:]])}` at commit "
              f"{git_commit(args.commit)}: {machine.get('cpu', '?')} x{machine.get('cpu_logical', '?')} "
              f"cores, {machine.get('ram_gb', '?')} GB RAM, Python {env.get('python', '?')}, "
              f"torch {env.get('torch', '?')} (CUDA {env.get('cuda')}), ultralytics "
              f"{env.get('ultralytics', '?')}, simplejpeg {env.get('simplejpeg', '?')}, opencv "
              f"{env.get('cv2', '?')}.", ""]
    drop = bench.get("drop") or {}
    if drop:
        lines += [f"Drop: {drop.get('images')} x {drop.get('width')}x{drop.get('height')} JPEG "
                  f"q{drop.get('quality')}, {drop.get('mb_min')}-{drop.get('mb_max')} MB each; "
                  f"{args.model.name}, batch {args.batch} (ours, fp16 on CUDA; the seed runs "
                  f"predict's default fp32, one image at a time); {args.reps} repetition(s), "
                  "median; every run in a fresh process, files in the page cache.", ""]
    lines += ["| row | variant run | img/s | min-max | x seed-queue | % of min(limit-decode, "
              "limit-model) | busy dec/inf/wrt | GPU util mean/max (nvidia-smi) | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|"]
    bound = goal.get("bound")
    for row in ROWS:
        v = variants.get(row, row)
        s = summary.get(v)
        u = util.get(row)
        u_txt = (f"{u['util_mean']:.0f}% / {u['util_max']:.0f}% ({u['samples']})" if u else
                 "n/a (dry run)" if args.dry_run else "-")
        if s is None:
            lines.append(f"| {row} | `{v}` | (no result) | | | | | {u_txt} | |")
            continue
        b = s["busy"]
        pct = (_f(100 * s["images_per_s"] / bound, ".0f", " %")
               if bound and row.startswith("ours") else "-")
        lines.append(f"| {row} | `{v}` | {s['images_per_s']:.2f} | {s['min']:.2f}-{s['max']:.2f} "
                     f"| {_f(s.get('ratio_vs_baseline'), '.2f', 'x')} | {pct} | "
                     f"{b['decode']:.2f}/{b['infer']:.2f}/{b['write']:.2f} | {u_txt} | "
                     f"{s['peak_rss_mb']:.0f} |")
    lines.append("")
    if goal["status"] == "n/a":
        lines.append(f"Target ours-exact >= {TARGET_PCT:.0f} % of min(limit-decode, limit-model): "
                     "**n/a** (a row is missing).")
    else:
        lines.append(
            ("(Dry run, not a GPU result.) " if args.dry_run else "") +
            f"Target ours-exact >= {TARGET_PCT:.0f} % of min(limit-decode, limit-model) = "
            f"{goal['bound']:.2f} img/s ({goal['bound_by']}): **{goal['status']}** "
            f"({goal['pct']:.0f} %). Ratio to seed-queue: ours-exact "
            f"{_f(goal['exact_vs_seed_queue'], '.2f', 'x')}, ours-fast "
            f"{_f(goal['fast_vs_seed_queue'], '.2f', 'x')}.")
    threads = bench.get("decode_threads") or {}
    if threads:
        lines.append("Decode threads: " + ", ".join(f"{r} {t}" for r, t in threads.items())
                     + f" (cores: {bench.get('cores')}).")
    u = util.get("ours-exact")
    if u:
        lines.append(f"GPU during ours-exact (nvidia-smi every {args.sample_ms} ms, inside the "
                     f"timed sections only, {u['samples']} samples over {u['timed_s']} s): "
                     f"utilization.gpu mean {u['util_mean']:.0f} %, max {u['util_max']:.0f} %; "
                     f"memory.used max {u['memory_max_mib']:.0f} MiB.")
    lines += ["", "| step | status | seconds | what it showed |", "|---|---|---|---|"]
    for s in steps.values():
        if s.name == "summary":
            continue
        text = (s.detail + "".join(f" (note: {n})" for n in s.notes)).replace("|", "\\|")
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {text} |")
    total = check.elapsed()
    lines += ["", f"Whole check: {total:.0f} s (budget {args.budget_s} s: "
              f"{'within' if total <= args.budget_s else 'OVER'})."]
    (check.out / "summary.md").write_text("\n".join(lines) + "\n")
    step.detail = (f"summary.md; target {goal['status']}"
                   + (f" ({goal['pct']:.0f} % of {goal['bound_by']})" if "pct" in goal else ""))


# ================================================================================================

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="the same steps on the CPU with small counts (CI, a machine without a GPU)")
    p.add_argument("--device", default=None, help="default cuda:0 (cpu with --dry-run)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default $OUT, else bench/results/gpu-check-<UTC time>)")
    p.add_argument("--wheels", type=Path, default=ROOT / ".whl",
                   help="wheels to install first (default .whl/, made by bench/gpu_wheels.py)")
    p.add_argument("--site", type=Path, default=Path("/tmp/image-etl-site"),
                   help="pip install --target for the wheels; put first on the children's path")
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--count", type=int, default=None, help="bench images (default 96; dry 4)")
    p.add_argument("--bench-size", default=None, help="bench image size (default 2048x12000; "
                                                      "dry 512x3000)")
    p.add_argument("--reps", type=int, default=None, help="bench repetitions (default 3; dry 1)")
    p.add_argument("--model-seconds", type=float, default=None,
                   help="limit-model's timed loop (default 3; dry 1)")
    p.add_argument("--demo-count", type=int, default=None, help="demo drop images (default 24; "
                                                                "dry 4)")
    p.add_argument("--demo-size", default=None, help="default 2048x12000; dry 512x3000")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sample-ms", type=int, default=200, help="nvidia-smi sampling period")
    p.add_argument("--nvidia-smi", choices=("auto", "yes", "no"), default="auto",
                   help="sample the GPU during the bench (auto: yes on a GPU, no with --dry-run)")
    p.add_argument("--only", default=None,
                   help="comma list of steps to run, with the steps they need (install and "
                        "summary always run): " + ", ".join(STEPS))
    p.add_argument("--budget-s", type=int, default=480, help="the whole check's time budget "
                                                             "(reported, not enforced)")
    p.add_argument("--deadline-s", type=int, default=570,
                   help="enforced: a step still running then is ended and fails, the steps "
                        "left fail unstarted, and the summary is written (default 570: inside "
                        "the device tool's 600 s per command)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    p.add_argument("--commit", default=None,
                   help="the commit being checked, for the summary (default: git's, if any)")
    p.add_argument("--_lease-child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_lease-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dry = args.dry_run
    defaults = {"device": "cpu" if dry else "cuda:0", "count": 4 if dry else 96,
                "bench_size": "512x3000" if dry else "2048x12000", "reps": 1 if dry else 3,
                "model_seconds": 1.0 if dry else 3.0, "demo_count": 4 if dry else 24,
                "demo_size": "512x3000" if dry else "2048x12000"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device.isdigit():
        args.device = f"cuda:{args.device}"
    if args.nvidia_smi == "auto":
        args.nvidia_smi = "no" if dry else "yes"
    args.only = None if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in args.only or [] if n not in STEPS]
    if unknown:
        p.error(f"--only: unknown step(s) {unknown}; steps: {', '.join(STEPS)}")
    if not dry and not args.device.startswith("cuda:"):
        p.error(f"--device {args.device!r}: the check is for cuda:N (use --dry-run for the CPU)")
    if dry and args.device != "cpu":
        p.error("--dry-run runs on cpu")
    if args.demo_count < 2 or args.count < 1 or args.reps < 1:
        p.error("--demo-count must be at least 2 (the lease step splits it), --count and --reps 1")
    # Timeouts: each is a cap far above what the step takes, so nothing waits forever.
    args.timeout_install = 300
    args.timeout_parity = 300 if not dry else 180
    args.timeout_step = 300 if not dry else 180
    args.timeout_bench_drop = 600
    args.timeout_bench = 600 if not dry else 300
    args.model = args.model.resolve()
    if args.out is None:
        env_out = os.environ.get("OUT")
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        args.out = Path(env_out) if env_out else BENCH / "results" / f"gpu-check-{stamp}"
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._lease_child is not None:
        return lease_child(args)
    check = Check(args)
    check.log(f"gpu-check {'DRY RUN on cpu' if args.dry_run else 'on ' + args.device} at "
              f"{check.started:%Y-%m-%d %H:%M:%S} UTC on {platform.node()} "
              f"({os.cpu_count()} cores), python {platform.python_version()}; output {args.out}; "
              f"scratch {check.work}")
    if args.dry_run:
        check.log("   note: dry run: small counts on cpu; parity fp16 and nvidia-smi are skipped "
                  "and say so; numbers are not GPU numbers")
    bench_drop: Child | None = None

    selected = set(STEPS if args.only is None else [*args.only, "install", "summary"])
    while True:  # with what they need
        more = {need for name in selected for need in NEEDS[name]} - selected
        if not more:
            break
        selected |= more

    def chosen(name: str) -> bool:
        return name in selected

    def skip(name: str) -> str | None:
        if not chosen(name):
            return "not in --only"
        if name == "parity-fp16" and args.dry_run:
            return "fp16 runs on CUDA only; the dry run is on cpu"
        if name == "gpu-util" and args.nvidia_smi == "no":
            return ("dry run on cpu: nvidia-smi not sampled" if args.dry_run
                    else "--nvidia-smi no: not sampled")
        return None

    plan: dict[str, Callable[[Step], None]] = {
        "install": lambda s: step_install(check, s),
        "parity-fp16": lambda s: step_parity(check, s, "fp16"),
        "parity-fp32": lambda s: step_parity(check, s, "fp32"),
        "demo-drop": lambda s: step_demo_drop(check, s),
        "infer-exact": lambda s: step_infer(check, s, False),
        "infer-fast": lambda s: step_infer(check, s, True),
        "lease": lambda s: step_lease(check, s),
        "bench-drop": lambda s: step_bench_drop(check, s, bench_drop),
        "bench": lambda s: step_bench(check, s),
        "gpu-util": lambda s: step_gpu_util(check, s),
        "summary": lambda s: write_summary(check, s),
    }
    assert tuple(plan) == STEPS
    def stopped(signum: int, _frame: Any) -> None:
        raise SystemExit(f"gpu-check: stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stopped)
    signal.signal(signal.SIGHUP, stopped)
    try:
        for name, fn in plan.items():
            check.run(name, fn, NEEDS[name], skip(name))
            if name == "install" and check.steps[name].status == OK and chosen("bench-drop"):
                bench_drop = start_bench_drop(check)  # ~1 s per full-size image: start it early
    except BaseException as exc:  # a signal or Ctrl-C: leave nothing running on the GPU
        check.log(f"gpu-check interrupted ({type(exc).__name__}: {exc}) during step "
                  f"{next(reversed(check.steps), '-')}")
        check.stop_children()
        check.save()
        check.close()
        raise
    finally:
        check.stop_children()
    failed = [s.name for s in check.steps.values() if s.status == FAILED]
    not_run = [s.name for s in check.steps.values()
               if s.status == SKIPPED and s.detail.startswith("needs ")]
    by_design = sum(s.status == SKIPPED for s in check.steps.values()) - len(not_run)
    total = check.elapsed()
    check.log("")
    for s in check.steps.values():
        check.log(f"  {s.status:<8} {s.name:<12} {s.seconds:6.1f}s  {s.detail}")
    check.log(f"gpu-check {'DRY RUN ' if args.dry_run else ''}took {total:.0f}s (budget "
              f"{args.budget_s}s{', OVER' if total > args.budget_s else ''}); results in {args.out}")
    if failed:
        check.log(f"gpu-check FAILED: {', '.join(failed)}"
                  + (f" (not run because of them: {', '.join(not_run)})" if not_run else ""))
    else:
        check.log(f"gpu-check: all steps ok ({sum(s.status == OK for s in check.steps.values())} "
                  f"ok, {by_design} skipped on purpose"
                  + (f", {len(not_run)} not run: {', '.join(not_run)}" if not_run else "") + ")")
    check.save()
    check.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
