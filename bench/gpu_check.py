"""The GPU check: the parity test, the engine CLI and the bench on one CUDA device, one summary.

    python3 bench/gpu_check.py --fetch-wheels   # here, where pip reaches PyPI: .whl/ for the GPU
    python3 bench/gpu_check.py [--device cuda:0] [--only STEPS] [--commit SHA]  # on the GPU
    python3 bench/gpu_check.py --dry-run        # the same steps on the CPU, small counts (CI)

The GPU machine reaches no registry; its Python 3.12 has its own CUDA torch (never carried),
numpy, OpenCV, pytest... What it lacks (CARRY, at requirements.txt's pins) travels in .whl/.
Steps (NEEDS), each a child process with a time limit: ok, FAILED (its last output line; exit
status 1; the steps that need it are skipped) or skipped (why). Into --out (default $OUT, else
bench/results/gpu-check-<time>/): gpu-check.log, summary.md, the bench's JSON and PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CARRY = ("ultralytics-opencv-headless", "simplejpeg", "msgspec")  # what the GPU machine lacks
NEEDS = {"env": (), "parity-fp16": ("env",), "parity-fp32": ("env",), "demo-drop": ("env",),
         "infer-exact": ("demo-drop",), "infer-fast": ("demo-drop",), "bench": ("env",)}
ROWS = ("seed-queue", "ours-exact", "ours-fast", "limit-decode", "limit-model")
ENV_CHECK = ("import json, sys, torch, ultralytics, simplejpeg, msgspec, cv2, image_etl.worker; "
             "print('ENV', json.dumps({'python': sys.version.split()[0], 'torch': torch.__version__,"
             " 'cuda': torch.version.cuda, 'ultralytics': ultralytics.__version__, 'gpus': "
             "[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}))")


class StepError(RuntimeError):
    """A step's check did not hold: the message says what was seen."""


def fetch_wheels(dest: Path) -> int:
    """CARRY's wheels, pinned as in requirements.txt, for CPython 3.12 on Linux x86-64."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    pins = [ln.split("#")[0].strip() for ln in lines if ln.split("==")[0].strip() in CARRY]
    return subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.12", "--implementation", "cp", "-d", str(dest),
         "--platform", "manylinux2014_x86_64", *pins], timeout=600).returncode


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.t0 = args, time.monotonic()
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.log_path = args.out / "gpu-check.log"
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in main
        self.steps: dict[str, tuple[str, float, str]] = {}  # name: status, seconds, detail
        self.versions: dict[str, Any] = {}
        paths = [str(ROOT / "include"), os.environ.get("PYTHONPATH", "")]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p),
                    "YOLO_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
                    "YOLO_CONFIG_DIR": str(self.work / "ultralytics")}

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text.encode() + b"\n")
        self.log.flush()

    def child(self, args: list[str], cap_s: float) -> str:
        """Run ``python ARGS`` (its output into the log); its output, or StepError."""
        limit = min(cap_s, self.args.deadline_s - (time.monotonic() - self.t0) - 15)
        if limit < 10:
            raise StepError(f"not started: --deadline-s {self.args.deadline_s} is spent")
        self.say("$ python " + " ".join(args))
        start = self.log.tell()
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=self.env,
                                stdout=self.log, stderr=subprocess.STDOUT, process_group=0)
        try:
            proc.wait(limit)
        except BaseException:  # its time is up, or ours (a signal): nothing stays running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if sys.exc_info()[0] is subprocess.TimeoutExpired:
                raise StepError(f"still running after {limit:.0f}s: ended") from None
            raise
        out = self.log_path.read_bytes()[start:].decode(errors="replace")
        if proc.returncode != 0:
            last = next((line for line in reversed(out.splitlines()) if line.strip()), "")
            raise StepError(f"exited {proc.returncode}: {last.strip()[:300]}")
        return out

    def step(self, name: str, run: Callable[[], str], skip: str | None) -> None:
        missing = [n for n in NEEDS[name] if self.steps.get(n, ("",))[0] != "ok"]
        status, detail, t0 = "skipped", skip or "needs " + ", ".join(missing), time.monotonic()
        if not skip and not missing:
            self.say(f"== {name}")
            try:
                status, detail = "ok", run()
            except Exception as exc:  # noqa: BLE001 - a failed step, named in the summary
                status, detail = "FAILED", str(exc) if isinstance(exc, StepError) else repr(exc)
        self.steps[name] = (status, time.monotonic() - t0, detail)
        self.say(f"== {name}: {status}: {detail}")


def steps(check: Check) -> dict[str, Callable[[], str]]:
    a, py = check.args, check.child
    drop = check.work / "demo" / "2026-11-20"

    def env() -> str:
        wheels = [] if a.dry_run else sorted((ROOT / ".whl").glob("*.whl"))  # for Python 3.12
        if wheels:
            site = "/tmp/image-etl-site"
            py(["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                "--no-cache-dir", "--upgrade", "--target", site, *map(str, wheels)], 300)
            check.env["PYTHONPATH"] = site + os.pathsep + check.env["PYTHONPATH"]
        found = re.search(r"^ENV (.*)$", py(["-c", ENV_CHECK], 120), re.M)
        if found is None:
            raise StepError("the import check printed no versions")
        check.versions = info = json.loads(found[1])
        index = int(a.device.split(":")[1]) if ":" in a.device else -1
        if not a.dry_run and len(info["gpus"]) <= index:
            raise StepError(f"torch {info['torch']} sees {len(info['gpus'])} CUDA device(s)")
        return (f"python {info['python']}, torch {info['torch']} (CUDA {info['cuda']}), "
                f"ultralytics {info['ultralytics']}, {len(wheels)} wheel(s) installed, GPUs: "
                f"{', '.join(info['gpus']) or 'none'}")

    def parity(precision: str) -> Callable[[], str]:
        def run() -> str:
            out = py(["-m", "pytest", "tests/test_worker.py", "-k", "test_exact_mode_equals_model_"
                      "predict", "--parity-device", a.device, "--parity-precision", precision,
                      "-q", "-s", "-p", "no:cacheprovider"], 300)
            last = [ln for ln in out.splitlines() if ln.strip()][-1]
            if not re.match(r"1 passed(,| in)", last):
                raise StepError(f"pytest: {last}")  # a skip is no pass
            return next((ln.strip() for ln in out.splitlines() if "parity on" in ln), "1 passed")
        return run

    def demo_drop() -> str:
        py(["-m", "image_etl", "make-drop", str(drop.parent), "--date", drop.name, "--count",
            str(a.demo_count), "--size", a.size], 300)
        found = len(list(drop.glob("*.jpg")))
        if found != a.demo_count:
            raise StepError(f"{found} of {a.demo_count} images")
        return f"{found} x {a.size} JPEGs"

    def infer(fast: bool) -> Callable[[], str]:
        def run() -> str:
            out = check.work / ("fast" if fast else "exact")
            py(["-m", "image_etl", "infer", str(drop), "--out", str(out), "--model", str(a.model),
                "--device", a.device, "--batch", str(a.batch), "--summary", str(out / "s.json"),
                *(["--fast-decode"] if fast else []), *(["--runtime", "torch"] * a.dry_run)], 300)
            s = json.loads((out / "s.json").read_text())
            if (s["device"], s["ok"], s["failed"]) != (a.device, a.demo_count, 0) \
                    or not s["detections"]:
                raise StepError(f"on {s['device']}: {s['ok']} ok, {s['failed']} failed, "
                                f"{s['detections']} detections of {a.demo_count} images")
            return (f"{s['ok']} images on {s['device']}, {s['detections']} detections, "
                    f"{s['images_per_s']:.1f} img/s")
        return run

    def bench() -> str:
        # The dry run runs what a GPU runs (PyTorch), not the CPU's OpenVINO.
        variants = [r + "-torch" if a.dry_run and r != "seed-queue" and r != "limit-decode"
                    else r for r in ROWS]
        before = set(a.out.glob("pipeline-*.json"))
        py([str(ROOT / "bench" / "pipeline_bench.py"), "--device", a.device, "--count",
            str(a.count), "--size", a.size, "--reps", str(a.reps), "--variants", ",".join(variants),
            "--batch", str(a.batch), "--model", str(a.model), "--model-seconds", str(a.model_s),
            "--memory-check", "no", "--results", str(a.out)], 600)
        found = sorted(set(a.out.glob("pipeline-*.json")) - before)
        if not found:
            raise StepError("pipeline_bench.py wrote no JSON")
        result = json.loads(found[-1].read_text())
        rows = [f"{v} {s['images_per_s']:.2f}" for v, s in result["summary"].items()]
        goals = [f"{g['status']} {g['target']} ({g['value']:.2f}{g['unit']})"
                 for g in result["targets"] if g["value"] is not None]
        return "; ".join([f"img/s, median of {a.reps}: " + ", ".join(rows), *goals])

    return {"env": env, "parity-fp16": parity("fp16"), "parity-fp32": parity("fp32"),
            "demo-drop": demo_drop, "infer-exact": infer(False), "infer-fast": infer(True),
            "bench": bench}


def summary(check: Check) -> str:
    """One table: each step, its status and what it showed (the bench: its rows and targets)."""
    a, env = check.args, check.versions
    lines = ["> **DRY RUN on the CPU**: small counts, not a GPU measurement.", ""] * a.dry_run
    lines += [f"#### {', '.join(env.get('gpus') or []) or 'no GPU'}, {dt.date.today()}, commit "
              f"{a.commit}", "", f"`python3 bench/gpu_check.py {' '.join(a.argv)}`: Python "
              f"{env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), "
              f"ultralytics {env.get('ultralytics')}; {a.model.name}, batch {a.batch}.", "",
              "| step | status | seconds | what it showed |", "|---|---|---|---|"]
    lines += [f"| {n} | {s} | {t:.0f} | {d.replace('|', '/')} |"
              for n, (s, t, d) in check.steps.items()]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="on the CPU, small counts (CI)")
    p.add_argument("--fetch-wheels", action="store_true", help="download .whl/ and stop")
    p.add_argument("--device", default=None, help="cuda:N (default cuda:0; cpu with --dry-run)")
    p.add_argument("--only", default=",".join(NEEDS), help="steps to run (with what they need)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--model", type=Path, default=ROOT / "models" / "demo-yolo11n-2cls.pt")
    p.add_argument("--commit", default="unknown", help="for the summary (the tool sends no .git)")
    p.add_argument("--deadline-s", type=int, default=570, help="steps past it fail, unstarted")
    a = p.parse_args(argv)
    a.argv = sys.argv[1:] if argv is None else argv
    a.device = a.device or ("cpu" if a.dry_run else "cuda:0")
    if a.dry_run != (a.device == "cpu") or not re.fullmatch(r"cpu|cuda:\d+", a.device):
        p.error(f"invalid parameter device: {a.device!r}: cuda:N, or cpu with --dry-run")
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    if not only or only - set(NEEDS):
        p.error(f"invalid parameter only: {sorted(only - set(NEEDS))}; steps: {', '.join(NEEDS)}")
    while more := {n for s in only for n in NEEDS[s]} - only:
        only |= more
    a.only = only
    dry = a.dry_run
    a.demo_count, a.count, a.reps, a.model_s = (4, 4, 1, 1) if dry else (12, 48, 3, 3)
    a.size, a.batch = "512x3000" if dry else "2048x12000", 8
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    a.out = (a.out or Path(os.environ.get("OUT") or ROOT / f"bench/results/gpu-check-{stamp}"))
    a.out, a.model = a.out.resolve(), a.model.resolve()
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.fetch_wheels:
        return fetch_wheels(ROOT / ".whl")
    a.out.mkdir(parents=True, exist_ok=True)
    check = Check(a)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("gpu-check: stopped by SIGTERM"))
    try:
        for name, run in steps(check).items():
            skip = ("not in --only" if name not in a.only else
                    "fp16 runs on CUDA only" if name == "parity-fp16" and a.dry_run else None)
            check.step(name, run, skip)
    finally:
        (a.out / "summary.md").write_text(summary(check))
        check.log.close()
        shutil.rmtree(check.work, ignore_errors=True)
    failed = [n for n, (s, _, _) in check.steps.items() if s == "FAILED"]
    print(f"gpu-check {'FAILED: ' + ', '.join(failed) if failed else 'ok'}; {a.out}/summary.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
