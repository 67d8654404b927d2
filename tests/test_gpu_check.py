"""bench/gpu_check.py, the GPU owner's one-command check, kept from rotting without a GPU.

The dry run (``--dry-run``: the same steps on the CPU, small counts) must run every step and
report it; a failing step must fail the run and name itself while independent steps go on;
the nvidia-smi sampling (skipped in a dry run) is exercised against a stand-in nvidia-smi.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.py"
STEPS = ["install", "parity-fp16", "parity-fp32", "demo-drop", "infer-exact", "infer-fast",
         "lease", "bench-drop", "bench", "gpu-util", "summary"]
ROWS = ["seed-queue", "ours-exact", "ours-fast", "limit-decode", "limit-model"]


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_check(args: list[str], out: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "include"), "YOLO_OFFLINE": "1",
           "OUT": str(out)}  # the output folder defaults to $OUT, as on the device machine
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check-out")
    proc = run_check(["--dry-run"], out, timeout=420)
    report = json.loads((out / "gpu-check.json").read_text()) if (out / "gpu-check.json").exists() \
        else None
    return proc, out, report


def steps_of(report) -> dict[str, dict]:
    return {s["name"]: s for s in report["steps"]}


@pytest.mark.slow
def test_dry_run_runs_and_reports_every_step(dry_run):
    proc, out, report = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert report is not None and report["dry_run"] and report["failed"] == []
    steps = steps_of(report)
    assert list(steps) == STEPS
    skipped = {name: s["detail"] for name, s in steps.items() if s["status"] != "ok"}
    assert skipped == {"parity-fp16": "fp16 runs on CUDA only; the dry run is on cpu",
                       "gpu-util": "dry run on cpu: nvidia-smi not sampled"}
    assert all(steps[n]["status"] == "skipped" for n in skipped)
    assert "gpu-check: all steps ok (9 ok, 2 skipped on purpose)" in proc.stdout
    log = (out / "gpu-check.log").read_text()
    assert "dry run: nvidia-smi not sampled" in log  # the skip is logged, not silent
    for name in STEPS:
        assert f"== {name}" in log


@pytest.mark.slow
def test_dry_run_steps_checked_what_they_ran(dry_run):
    proc, out, report = dry_run
    steps = steps_of(report)
    parity = steps["parity-fp32"]["data"]
    assert (parity["tests"], parity["failures"], parity["errors"], parity["skipped"]) == (1, 0, 0, 0)
    assert steps["parity-fp32"]["detail"].startswith("parity on cpu fp32:")
    for name in ("infer-exact", "infer-fast"):
        data = steps[name]["data"]
        assert data["device"] == "cpu" and data["processed"] == data["ok"] == 4
        assert data["failed"] == 0 and data["detections"] > 0
        assert 0.0 <= data["accuracy"]["recall"] <= 1.0
    shards = steps["lease"]["data"]["shards"]
    assert [s["device"] for s in shards] == ["cuda:0", "cuda:0"]  # the pretend single GPU
    first, second = sorted(shards, key=lambda s: s["t_leased"])
    assert not first["waited"] and second["waited"]
    assert first["t_released"] <= second["t_leased"]
    assert sum(s["processed"] for s in shards) == 4
    bench = steps["bench"]["data"]
    assert set(bench["variants"]) == set(ROWS)
    assert all(v in bench["summary"] and bench["summary"][v]["images_per_s"] > 0
               for v in bench["variants"].values())
    assert all(t == [bench["cores"]] for t in bench["decode_threads"].values())
    assert all("window_unix" in r for r in bench["runs"])


@pytest.mark.slow
def test_dry_run_writes_one_folder_the_device_tool_can_return(dry_run):
    _, out, report = dry_run
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    names = {p.name for p in files}
    assert {"gpu-check.log", "gpu-check.json", "summary.md"} <= names
    assert any(re.fullmatch(r"pipeline-[\d-]+\.json", n) for n in names)
    assert any(re.fullmatch(r"pipeline-[\d-]+\.png", n) for n in names)
    # What the device tool brings back from $OUT: at most 8 files, plain names, shallow.
    assert len(files) <= 8, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for p in files for part in p.parts)
    assert all(len(p.parts) <= 3 for p in files)
    png = next(out.glob("pipeline-*.png")).read_bytes()
    assert png.startswith(b"\x89PNG")


@pytest.mark.slow
def test_dry_run_summary_has_every_row_and_the_target(dry_run):
    _, out, report = dry_run
    summary = (out / "summary.md").read_text()
    assert summary.startswith("> **DRY RUN on the CPU**")
    table = {line.split("|")[1].strip(): line for line in summary.splitlines()
             if line.startswith("| ") and line.count("|") == 10}
    for row in ROWS:
        assert row in table, summary
        cells = [c.strip() for c in table[row].split("|")[1:-1]]
        assert float(cells[2]) > 0, table[row]  # img/s
    assert "`ours-exact-torch`" in table["ours-exact"]  # what ran on the CPU, said
    target = steps_of(report)["summary"]["data"]["target"]
    assert target["status"] in ("PASS", "MISS")
    assert target["bound"] == min(target["images_per_s"]["limit-decode"],
                                  target["images_per_s"]["limit-model"])
    assert f"**{target['status']}** ({target['pct']:.0f} %)" in summary
    assert "Ratio to seed-queue: ours-exact" in summary
    assert "| parity-fp16 | skipped |" in summary and "| lease | ok |" in summary


def test_a_failed_step_fails_the_run_names_itself_and_the_rest_goes_on(tmp_path):
    # make-drop refuses images under 64 px: demo-drop fails, infer-exact (which needs it) is
    # not run, bench-drop (independent) still runs, and so does the summary.
    proc = run_check(["--dry-run", "--only", "infer-exact,bench-drop", "--demo-size", "10x10"],
                     tmp_path, timeout=240)
    assert proc.returncode == 1, proc.stdout[-3000:]
    steps = steps_of(json.loads((tmp_path / "gpu-check.json").read_text()))
    assert steps["demo-drop"]["status"] == "FAILED"
    assert "make-drop exited 2" in steps["demo-drop"]["detail"]
    assert "at least 64" in steps["demo-drop"]["detail"]  # the child's own error line
    assert steps["infer-exact"]["status"] == "skipped"
    assert steps["infer-exact"]["detail"] == "needs demo-drop (FAILED)"
    assert steps["bench-drop"]["status"] == "ok" and steps["summary"]["status"] == "ok"
    assert steps["lease"]["detail"] == "not in --only"
    assert "gpu-check FAILED: demo-drop (not run because of them: infer-exact)" in proc.stdout
    assert "| demo-drop | FAILED |" in (tmp_path / "summary.md").read_text()


FAKE_NVIDIA_SMI = """\
#!{python}
# A stand-in for `nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --loop-ms=N`.
import datetime, os, sys, time
period = int(next(a for a in sys.argv if a.startswith("--loop-ms=")).split("=")[1]) / 1000
shift = datetime.timedelta(seconds=float(os.environ.get("FAKE_SMI_SHIFT_S", "0")))
i = 0
while True:
    now = datetime.datetime.now() + shift
    print(f"{{now:%Y/%m/%d %H:%M:%S.%f}}"[:-3] + f", {{10 + i % 80}}, {{1000 + i}}", flush=True)
    i += 1
    time.sleep(period)
"""


@pytest.mark.parametrize("shift_s", [0, 3600], ids=["same-clock", "other-time-zone"])
def test_gpu_sampling_finds_the_samples_inside_the_timed_sections(tmp_path, monkeypatch, shift_s):
    gpu_check = gpu_check_module()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text(FAKE_NVIDIA_SMI.format(python=sys.executable))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SMI_SHIFT_S", str(shift_s))
    args = gpu_check.parse_args(["--dry-run", "--nvidia-smi", "yes", "--sample-ms", "50",
                                 "--out", str(tmp_path / "out")])
    check = gpu_check.Check(args)
    try:
        sampler = gpu_check.Sampler(check, 0)
        time.sleep(0.5)
        window = [time.time(), None]
        time.sleep(0.6)
        window[1] = time.time()
        time.sleep(0.3)
        samples = sampler.stop()
        assert sampler.child.proc.poll() is not None, "nvidia-smi left running"
        assert len(samples) >= 10
        assert (tmp_path / "out" / "nvidia-smi.csv").is_file()
        stats = gpu_check.window_stats(samples, [{"window_unix": window}])
        assert stats is not None and 4 <= stats["samples"] <= 20, stats
        assert 10 <= stats["util_mean"] <= stats["util_max"] <= 89
        assert stats["memory_max_mib"] >= 1000

        bench = gpu_check.Step("bench")
        bench.data = {"samples": samples, "variants": {"ours-exact": "ours-exact"},
                      "runs": [{"variant": "ours-exact", "window_unix": window}]}
        check.steps["bench"] = bench
        step = gpu_check.Step("gpu-util")
        gpu_check.step_gpu_util(check, step)
        assert step.detail.startswith("ours-exact: GPU busy")
        assert step.data["per_row"]["ours-exact"]["samples"] == stats["samples"]
        bench.data["runs"] = [{"variant": "ours-exact", "window_unix": [0.0, 1.0]}]  # 1970
        with pytest.raises(gpu_check.StepError, match="none of the .* samples fell inside"):
            gpu_check.step_gpu_util(check, gpu_check.Step("gpu-util"))
    finally:
        check.close()


def test_a_signal_stops_the_check_and_everything_it_started(tmp_path):
    import signal

    import psutil

    env = {**os.environ, "PYTHONPATH": str(ROOT / "include"), "YOLO_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        lines = []
        deadline = time.monotonic() + 120
        for line in proc.stdout:  # until the parity step's pytest is running
            lines.append(line)
            if "[parity-fp32] $ " in line or time.monotonic() > deadline:
                break
        scratch = re.search(r"scratch (\S+)", lines[0]).group(1)
        time.sleep(1.0)
        children = [c for c in psutil.Process(proc.pid).children(recursive=True)]
        assert children, "nothing running to stop"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[0]
        took = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert took < 4, f"took {took:.1f}s to stop"
    assert "gpu-check interrupted" in rest and "during step parity-fp32" in rest
    assert not Path(scratch).exists()
    alive = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"left running: {alive}"
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert steps_of(report)["install"]["status"] == "ok"
