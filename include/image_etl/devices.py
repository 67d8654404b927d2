"""Device lists ("auto", "cpu", "0,1", "cuda:0,cuda:1") and the per-host device lease.

The lease is an exclusive ``flock`` on one lock file per physical GPU, so two workers on one
host (a backfill and the nightly run, say) never share a GPU. A GPU is named by its UUID, not
by the index this process sees: ``CUDA_VISIBLE_DEVICES=1`` makes the host's second GPU this
process's ``cuda:0``, and two containers may see one GPU under different indices. The UUIDs
come from ``nvidia-smi -L`` (NVML when there is no nvidia-smi), never from torch, and are
mapped through ``CUDA_VISIBLE_DEVICES`` as CUDA does. The kernel drops the lock when the
process dies, so a killed task never leaves a device locked; the wait for a busy GPU is
bounded (``IMAGE_ETL_LEASE_TIMEOUT_S``) and its error names the lock and who holds it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from image_etl.errors import SettingsError
from image_etl.gpu_identity import GpuIdentityUnknown, gpu_identities

log = logging.getLogger(__name__)

DEFAULT_LOCK_DIR = Path(os.environ.get("IMAGE_ETL_LOCK_DIR", "/tmp/image_etl-device-locks"))
LEASE_TIMEOUT_ENV = "IMAGE_ETL_LEASE_TIMEOUT_S"
DEFAULT_LEASE_TIMEOUT_S = 600.0


class DeviceError(RuntimeError):
    """A shard's device does not exist on the host that runs it (the message names both)."""


class DeviceBusyError(TimeoutError):
    """The lease waited its bound for a busy GPU; the message names the lock and its holder.
    Retryable: the holder may be done by the next attempt."""


def cuda_device_count() -> int:
    """GPUs torch can use here (imports torch: for the worker, where a model runs anyway)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of the worker
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def fleet_gpu_count() -> int:
    """GPUs a worker of this deployment has, as the planning tasks (discover, partition) see
    it: ``IMAGE_ETL_GPUS`` when set (a scheduler host often has none), else this host's, counted
    without torch."""
    value = os.environ.get("IMAGE_ETL_GPUS")
    if value:
        try:
            return int(value)
        except ValueError:
            raise SettingsError("IMAGE_ETL_GPUS", f"expected a number of GPUs, got {value!r}") from None
    from image_etl.resources import gpu_count

    return gpu_count()


def parse_devices(spec: str | list[str] | tuple[str, ...], available_gpus: int | None = None,
                  param: str = "devices") -> list[str]:
    """Normalise a device list to torch names: ``["cuda:0", "cuda:1"]`` or ``["cpu", ...]``.

    ``auto`` means every visible GPU, or one ``cpu`` if there is none. ``cpu`` may repeat
    (``cpu,cpu`` = two CPU workers), which makes multi-worker runs testable without a GPU.
    A GPU may not repeat: two workers on one GPU is what the lease exists to prevent.
    ``param`` names the setting in error messages (the DAG's ``devices``, the CLI's ``device``).
    """
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    items = [str(i).strip().lower() for i in items if str(i).strip()]
    if not items:
        raise SettingsError(param, "is empty; use 'auto', 'cpu' or GPU indices like '0,1'")
    gpus = fleet_gpu_count() if available_gpus is None else available_gpus
    if items == ["auto"]:
        return [f"cuda:{i}" for i in range(gpus)] or ["cpu"]
    devices: list[str] = []
    for item in items:
        if item == "cpu":
            devices.append("cpu")
            continue
        index = item.removeprefix("cuda:")
        if not index.isdigit():
            raise SettingsError(param, f"unknown device {item!r}; use 'auto', 'cpu', "
                                           "'0,1' or 'cuda:0,cuda:1'")
        if int(index) >= gpus:
            raise SettingsError(param, f"{item!r} does not exist on this host "
                                           f"({gpus} GPU(s) visible)")
        name = f"cuda:{int(index)}"
        if name in devices:
            raise SettingsError(param, f"{name} is listed twice")
        devices.append(name)
    return devices


def shard_devices(spec: str, available_gpus: int | None = None) -> list[str]:
    """The device of each shard: ``auto`` gives one ``cuda`` (any free GPU of the host that
    runs the shard) per GPU, so shards are not tied to GPU indices of another host; an
    explicit list pins each shard to its device."""
    devices = parse_devices(spec, available_gpus)
    if str(spec).strip().lower() == "auto" and devices != ["cpu"]:
        return ["cuda"] * len(devices)
    return devices


def check_local_device(device: str, local_gpus: int | None = None) -> None:
    """Refuse, before any work, a shard device this host does not have.

    The shard's device was chosen on the scheduler's side (IMAGE_ETL_GPUS, or the scheduler's
    own GPUs); the worker that runs it may have fewer, or may have lost its GPU (driver gone,
    CUDA_VISIBLE_DEVICES changed). Without this check that shows up later as a confusing
    model-load or CUDA error.
    """
    if device == "cpu":
        return
    count = cuda_device_count() if local_gpus is None else local_gpus
    index = device.removeprefix("cuda").removeprefix(":")
    if count > (int(index) if index.isdigit() else 0):
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    why = (f"{count} CUDA GPU(s) visible" if count else
           "no usable CUDA GPU (torch.cuda.is_available() is False: no GPU, driver or CUDA "
           "runtime here)")
    if visible is not None:
        why += f", CUDA_VISIBLE_DEVICES={visible!r}"
    raise DeviceError(f"shard device {device!r} is not available on host {os.uname().nodename}: "
                      f"{why}")


# --- the lease ----------------------------------------------------------------------------------------

def lease_timeout_s(env: Mapping[str, str] | None = None) -> float:
    """How long a lease waits for a busy GPU: ``IMAGE_ETL_LEASE_TIMEOUT_S`` (default 600)."""
    raw = (os.environ if env is None else env).get(LEASE_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_LEASE_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 7 * 86400:
        raise SettingsError(LEASE_TIMEOUT_ENV, f"expected seconds between 0 and 604800, got {raw!r}")
    return value


@contextlib.contextmanager
def lease(device: str, lock_dir: Path | None = None, timeout_s: float | None = None,
          poll_s: float = 0.5, local_gpus: int | None = None, holder: str = "",
          gpu_ids: Sequence[str] | None = None) -> Iterator[str]:
    """Hold a device exclusively on this host for the ``with`` block; yields its name.

    ``cuda`` takes whichever local GPU is free first; ``cuda:N`` waits for that one. CPU is
    not leased (repeated ``cpu`` workers share the cores by design). Waits for a busy GPU,
    logging who has it, up to ``timeout_s`` (None: ``IMAGE_ETL_LEASE_TIMEOUT_S``), then
    raises DeviceBusyError naming the lock files and their holders. ``holder`` says what
    takes the GPU (the run and shard), written into the lock file for whoever waits.
    ``gpu_ids``: each CUDA ordinal's physical identity (None: found from the driver).
    """
    if device == "cpu":
        yield device
        return
    if device == "cuda":
        count = cuda_device_count() if local_gpus is None else local_gpus
        candidates = [f"cuda:{i}" for i in range(count)]
        if not candidates:
            raise RuntimeError("this shard needs a GPU but this host has none visible")
    else:
        candidates = [device]
    lock_dir = DEFAULT_LOCK_DIR if lock_dir is None else lock_dir
    timeout_s = lease_timeout_s() if timeout_s is None else timeout_s
    locks = _lock_files(candidates, lock_dir, gpu_ids)
    lock_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as opened:
        fds: dict[str, int] = {}
        for name in candidates:
            try:
                fd = os.open(locks[name], os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise DeviceError(f"cannot open the lease lock {locks[name]} for {name}: "
                                  f"{exc.strerror or exc}") from exc
            opened.callback(os.close, fd)  # closing the descriptor releases the flock
            fds[name] = fd
        held = _wait_for_one(device, fds, locks, timeout_s, poll_s)
        fd = fds[held]
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_line(holder).encode(), 0)
        log.info("leased %s (lock %s)", held, locks[held])
        yield held


def _lock_files(candidates: list[str], lock_dir: Path,
                gpu_ids: Sequence[str] | None) -> dict[str, Path]:
    """One lock file per physical GPU (``gpu-<UUID>.lock``); by index (``cuda-N.lock``) only
    where the identity cannot be found, which is said."""
    if gpu_ids is None:
        try:
            gpu_ids = gpu_identities()
        except GpuIdentityUnknown as exc:
            log.warning("GPU identity unknown (%s): locking by CUDA index instead, which does "
                        "not keep apart processes that see one GPU under different indices "
                        "(see docs/deploy.md, GPU identity)", exc)
            gpu_ids = []
    locks = {}
    for name in candidates:
        index = int(name.removeprefix("cuda:"))
        if index < len(gpu_ids):
            locks[name] = lock_dir / f"gpu-{re.sub(r'[^A-Za-z0-9._-]', '_', gpu_ids[index])}.lock"
        else:
            if gpu_ids:
                log.warning("%s is not among this process's %d GPU(s) with a known identity: "
                            "locking it by index", name, len(gpu_ids))
            locks[name] = lock_dir / f"cuda-{index}.lock"
    return locks


def _wait_for_one(device: str, fds: dict[str, int], locks: dict[str, Path], timeout_s: float,
                  poll_s: float) -> str:
    start = time.monotonic()
    announced = False
    while True:
        held = next((name for name, fd in fds.items() if _try_lock(fd)), None)
        if held is not None:
            return held
        waited = time.monotonic() - start
        if waited >= timeout_s:
            busy = "; ".join(f"{name}: lock {locks[name]} held by {_holder(fd)}"
                             for name, fd in fds.items())
            raise DeviceBusyError(f"{device} stayed busy for {waited:.0f}s (the lease waits up "
                                  f"to {timeout_s:g}s, {LEASE_TIMEOUT_ENV}): {busy}")
        if not announced:
            log.info("waiting for %s (up to %gs): busy %s", device, timeout_s,
                     ", ".join(f"{name} ({_holder(fd)})" for name, fd in fds.items()))
            announced = True
        time.sleep(max(0.0, min(poll_s, timeout_s - waited)))


def _holder_line(what: str) -> str:
    since = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()} since {since}{', ' + what if what else ''}\n"


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 400, 0).decode(errors="replace").strip() or "unknown"
    return "unknown"
