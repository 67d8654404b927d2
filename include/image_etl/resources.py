"""What this process may use: CPU cores (affinity and cgroup quota) and GPUs (without torch).

``os.cpu_count()`` is the host's count: a container limited to 4 of 64 cores (one Celery
worker per GPU, say) would start 64 decode threads and oversubscribe the host 16x. GPUs are
counted from NVML or the driver's /proc entries so that tasks which only plan the work
(discover, partition) need not import torch (about 1 s and 650 MB each).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")


def cpu_count(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Cores this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota in cores (``cpu.max`` of cgroup v2, ``cfs_quota_us`` of v1); None if unlimited."""
    v2 = root / "cpu.max"
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def gpu_count(env: dict[str, str] | None = None, proc: Path = NVIDIA_PROC) -> int:
    """NVIDIA GPUs visible to this process, without importing torch.

    NVML when the driver's library loads, else the driver's /proc entries; then limited by
    ``CUDA_VISIBLE_DEVICES`` as CUDA would (a list is cut at its first invalid entry).
    """
    env = dict(os.environ) if env is None else env
    found = _nvml_count()
    if found is None:
        try:
            found = sum(1 for _ in proc.iterdir())
        except OSError:
            found = 0
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return found
    count = 0
    for item in visible.split(","):
        item = item.strip()
        if not item or (item.isdigit() and int(item) >= found) or item.startswith("-"):
            break
        count += 1
    return min(count, found)


def _nvml_count() -> int | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver library on this host: pynvml's own error types vary
        return None
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            log.debug("nvmlShutdown failed", exc_info=True)
