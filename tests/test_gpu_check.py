"""bench/gpu_check.py kept from rotting without a GPU: its --dry-run runs every step on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT


def gpu_check(args: list[str], out: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out)}  # the output folder defaults to $OUT, as on the GPU
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), *args], cwd=ROOT,
                          env=env, text=True, capture_output=True, timeout=timeout)


def table(out: Path) -> dict[str, list[str]]:
    """summary.md's step table: step -> [status, seconds, what it showed]."""
    rows = [line.strip("|").split(" | ") for line in (out / "summary.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| step ")]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_one_summary(tmp_path):
    proc = gpu_check(["--dry-run", "--commit", "abc123"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    steps = table(tmp_path)
    assert list(steps) == ["env", "parity-fp16", "parity-fp32", "demo-drop", "infer-exact",
                           "infer-fast", "bench"]
    assert steps.pop("parity-fp16")[::2] == ["skipped", "fp16 runs on CUDA only"]
    assert {s[0] for s in steps.values()} == {"ok"}, steps
    assert steps["parity-fp32"][2].startswith("parity on cpu fp32:")
    assert steps["infer-exact"][2].startswith("4 images on cpu, ")
    shown = steps["bench"][2]
    for variant in ("seed-queue", "ours-exact-torch", "ours-fast-torch", "limit-decode",
                    "limit-model-torch"):
        assert f"{variant} " in shown
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("> **DRY RUN on the CPU**") and "commit abc123" in summary
    assert len(list(tmp_path.glob("pipeline-*.json"))) == 1  # the bench's files come back too
    assert len(list(tmp_path.iterdir())) <= 8  # what the device tool returns from $OUT


@pytest.mark.slow
def test_a_failed_step_fails_the_run_and_skips_what_needs_it(tmp_path):
    proc = gpu_check(["--dry-run", "--only", "infer-exact", "--model", str(tmp_path / "no.pt")],
                     tmp_path, timeout=300)
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[-1].startswith("gpu-check FAILED: infer-exact;")
    steps = table(tmp_path)
    assert steps["demo-drop"][0] == "ok"  # what --only needs runs too
    assert steps["infer-exact"][0] == "FAILED" and "no.pt" in steps["infer-exact"][2]
    assert steps["bench"] == ["skipped", "0", "not in --only"]


def test_bad_arguments_are_refused_naming_the_parameter(tmp_path):
    for args, name in ((["--device", "cpu"], "device"), (["--dry-run", "--device", "cuda:0"],
                                                         "device"), (["--only", "lease"], "only")):
        proc = gpu_check(args, tmp_path, timeout=60)
        assert proc.returncode == 2 and f"invalid parameter {name}" in proc.stderr, proc.stderr
    assert not (tmp_path / "summary.md").exists()
