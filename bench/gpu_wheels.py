"""Download, here, the wheels the GPU machine lacks, into .whl/, and check the set.

    python3 bench/gpu_wheels.py            # download into .whl/ and check
    python3 bench/gpu_wheels.py --check    # only check what .whl/ holds

The GPU machine (the device tool's `nvidia-h200` kind) runs Python 3.12 with its own, older
torch and no network: bench/gpu_check.py installs whatever lies in .whl/ there with
`pip install --no-index --no-deps --target ...`. Only the engine + bench + pytest run there
(no Airflow, no OpenVINO), and the machine already has torch, torchvision, numpy, OpenCV and
the rest (DEVICE_HAS below, from the device tool's KINDS.md as read on 2026-11-17), so the
wheels are the two packages it lacks. torch is never carried (the machine's own is CUDA's).

The check: one version per package, cp312 / py3 x86-64 tags only, every Requires-Dist of a
carried wheel (markers evaluated for CPython 3.12 on Linux x86-64, extras left out) met by
another carried wheel, by the machine, or named in OMITTED with the reason it is not needed,
and the whole transfer (the repo's files + .whl/) under the device tool's 64 MiB.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
# The pins of requirements.txt that the engine + bench need and the machine lacks.
CARRY = ["ultralytics-opencv-headless==8.4.190", "simplejpeg==1.9.0"]
# On the machine already (KINDS.md's package list; versions where its pip-list row gives one).
DEVICE_HAS: dict[str, str | None] = {
    "torch": "2.11.0", "torchvision": "0.26.0", "numpy": "2.5.2", "opencv-python-headless": None,
    "matplotlib": None, "pillow": None, "pyyaml": None, "requests": None, "psutil": None,
    "nvidia-ml-py": None, "httpx": None, "pytest": None, "pytest-timeout": None,
}
# Required by a carried wheel's metadata but never imported on the engine's, the bench's or
# the parity test's paths (checked: not in sys.modules after predict + run_shard + the bench).
OMITTED = {
    "polars": "ultralytics imports it only to export results and metrics as tables "
              "(Results.to_df, training, plots); with polars-runtime-32 it is ~52 MB, most of the 64 MiB",
    "ultralytics-thop": "FLOPs counting; ultralytics falls back to 0 FLOPs without it",
    "ultralytics-platform": "Ultralytics' hub client, imported lazily on first use only",
}
LIMIT_MIB = 64
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download(wheels: Path) -> None:
    wheels.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp",
           *[arg for p in PLATFORMS for arg in ("--platform", p)], "-d", str(wheels), *CARRY]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, timeout=600)


def wheel_metadata(path: Path) -> tuple[str, str, list[str], list[str]]:
    """(name, version, tags, Requires-Dist) from a wheel's METADATA and WHEEL files."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
        wheel = z.read(meta.replace("METADATA", "WHEEL")).decode()
    fields = [line.split(": ", 1) for line in text.split("\n\n")[0].splitlines() if ": " in line]
    name = next(v for k, v in fields if k == "Name")
    version = next(v for k, v in fields if k == "Version")
    requires = [v for k, v in fields if k == "Requires-Dist"]
    tags = [line.split(": ", 1)[1] for line in wheel.splitlines() if line.startswith("Tag: ")]
    return name, version, tags, requires


def check(wheels: Path) -> list[str]:
    """Problems with the wheel set (empty: fine); prints what it found."""
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # pip always carries it
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.version import Version

    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython",
           "extra": ""}
    problems: list[str] = []
    files = sorted(wheels.glob("*.whl"))
    carried: dict[str, str] = {}
    requirements: list[tuple[str, Requirement]] = []
    total = 0
    for path in files:
        name, version, tags, requires = wheel_metadata(path)
        size = path.stat().st_size
        total += size
        print(f"  {path.name}  {size / 2**20:.2f} MiB  tags {', '.join(tags)}")
        key = canonical(name)
        if key in carried:
            problems.append(f"two versions of {name}: {carried[key]} and {version}")
        carried[key] = version
        if key == "torch":
            problems.append("torch is carried: the GPU machine's own CUDA build must be used")
        if not any(t.startswith(("cp312-", "py3-", "py2.py3-")) and
                   (t.endswith("-any") or "x86_64" in t) for t in tags):
            problems.append(f"{path.name}: no tag for CPython 3.12 on x86-64 ({tags})")
        requirements += [(name, Requirement(r)) for r in requires]
    for key in (canonical(c.split("==")[0]) for c in CARRY):
        if key not in carried:
            problems.append(f"{key} is not under {wheels}")
    print("requirements of the carried wheels (CPython 3.12, Linux x86-64, no extras):")
    for owner, req in requirements:
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        key = canonical(req.name)
        if key in carried:
            ok = req.specifier.contains(Version(carried[key]), prereleases=True)
            where = f"carried {carried[key]}"
        elif key in DEVICE_HAS:
            known = DEVICE_HAS[key]
            ok = known is None or req.specifier.contains(Version(known), prereleases=True)
            where = f"on the machine ({known or 'version not listed'})"
        elif key in OMITTED:
            ok, where = True, f"left out: {OMITTED[key]}"
        else:
            ok, where = False, "MISSING: neither carried nor on the machine"
        print(f"  {owner}: {req}  ->  {where}{'' if ok else '  <-- PROBLEM'}")
        if not ok:
            problems.append(f"{owner} needs {req}: {where}")
    repo = repo_bytes()
    print(f"size: wheels {total / 2**20:.1f} MiB + the repo's files {repo / 2**20:.1f} MiB = "
          f"{(total + repo) / 2**20:.1f} MiB of the device tool's {LIMIT_MIB} MiB")
    if total + repo > LIMIT_MIB * 2**20:
        problems.append(f"{(total + repo) / 2**20:.1f} MiB to carry, over {LIMIT_MIB} MiB")
    return problems


def repo_bytes() -> int:
    """Tracked + untracked-not-ignored files: what the device tool sends besides carry."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    return sum((ROOT / p).stat().st_size for p in out.decode().split("\0")
               if p and (ROOT / p).is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only check what --wheels holds")
    p.add_argument("--wheels", type=Path, default=WHEELS)
    args = p.parse_args(argv)
    if not args.check:
        download(args.wheels)
    print(f"wheels under {args.wheels}:")
    problems = check(args.wheels)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print("wheel set ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
