"""Which physical GPU is ``cuda:N``: the host's GPUs (``nvidia-smi -L``, else NVML; never a
torch import) mapped through ``CUDA_VISIBLE_DEVICES`` as CUDA reads it, so a lease can lock the
physical device whatever index a process sees it under."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence

NVIDIA_SMI_TIMEOUT_S = 15.0  # a wedged driver can make nvidia-smi hang


class GpuIdentityUnknown(Exception):
    """This process's GPUs cannot be told apart by physical identity (the message says why)."""


_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_GPU_LINE = re.compile(r"^GPU (\d+): (.*?) \(UUID: (GPU-[^)\s]+)\)")
_MIG_LINE = re.compile(r"^\s+MIG .*\(UUID: (MIG-[^)\s]+)\)")


@dataclasses.dataclass(frozen=True)
class PhysicalGpu:
    """One GPU of the host as the driver lists it (PCI bus order), with its MIG devices."""

    name: str
    uuid: str
    migs: tuple[str, ...] = ()


def parse_nvidia_smi_list(text: str) -> list[PhysicalGpu]:
    """``nvidia-smi -L`` output → the GPUs in its order (``GPU 0: NAME (UUID: GPU-...)``,
    each followed by its ``MIG ... (UUID: MIG-...)`` lines when MIG is on)."""
    gpus: list[PhysicalGpu] = []
    for line in text.splitlines():
        if match := _GPU_LINE.match(line):
            gpus.append(PhysicalGpu(match.group(2).strip(), match.group(3)))
        elif (match := _MIG_LINE.match(line)) and gpus:
            last = gpus[-1]
            gpus[-1] = dataclasses.replace(last, migs=(*last.migs, match.group(1)))
    return gpus


def cuda_identities(visible: str | None, gpus: Sequence[PhysicalGpu] | None,
                    device_order: str | None = None) -> list[str]:
    """The physical identity (GPU or MIG UUID) of each CUDA ordinal of a process started with
    ``CUDA_VISIBLE_DEVICES=visible`` (None: unset) on a host with ``gpus`` (None: unknown).

    As CUDA reads the variable: a comma list of indices, UUIDs (``GPU-...``, or a unique
    prefix) or MIG UUIDs (``MIG-...``), cut at its first invalid entry; empty or ``-1``: no
    GPU. Raises GpuIdentityUnknown where the indices cannot be mapped for sure.
    """
    if visible is None:
        if gpus is None:
            raise GpuIdentityUnknown("no GPU listing (neither nvidia-smi nor NVML answered)")
        entries = [str(i) for i in range(len(gpus))]
    else:
        entries = [e.strip() for e in visible.split(",")]
    ids: list[str] = []
    for entry in entries:
        identity = _identity_of(entry, gpus, device_order)
        if identity is None:  # CUDA ignores this entry and every one after it
            break
        ids.append(identity)
    return ids


def _identity_of(entry: str, gpus: Sequence[PhysicalGpu] | None,
                 device_order: str | None) -> str | None:
    if entry.isdigit():
        if gpus is None:
            raise GpuIdentityUnknown(f"CUDA_VISIBLE_DEVICES names GPU index {entry}, and "
                                     "there is no GPU listing to map it")
        if int(entry) >= len(gpus):
            return None
        gpu = gpus[int(entry)]
        if gpu.migs:
            raise GpuIdentityUnknown(f"GPU {entry} ({gpu.uuid}) is in MIG mode: name its MIG "
                                     "devices by UUID in CUDA_VISIBLE_DEVICES")
        if len({g.name for g in gpus}) > 1 and (device_order or "").upper() != "PCI_BUS_ID":
            # CUDA's default order is fastest first; the driver's listing is PCI bus order.
            raise GpuIdentityUnknown("this host mixes GPU models and CUDA_DEVICE_ORDER is not "
                                     "PCI_BUS_ID, so CUDA's index order may differ from "
                                     "nvidia-smi's")
        return gpu.uuid
    for prefix, listed in (("GPU-", [g.uuid for g in gpus or ()]),
                           ("MIG-", [m for g in gpus or () for m in g.migs])):
        if not entry.upper().startswith(prefix):
            continue
        matches = [u for u in listed if u.lower().startswith(entry.lower())]
        if len(matches) == 1:
            return matches[0]
        if matches:  # an ambiguous prefix is invalid to CUDA too
            return None
        if prefix == "MIG-" or re.fullmatch(f"GPU-{_UUID}", entry):
            return entry  # a whole UUID is its own identity, listed here or not
        if gpus is None:
            raise GpuIdentityUnknown(f"CUDA_VISIBLE_DEVICES names {entry!r}, a UUID prefix, "
                                     "and there is no GPU listing to complete it")
        return None
    return None


def read_gpu_listing() -> list[PhysicalGpu]:
    """The host's GPUs, from ``nvidia-smi -L`` (bounded), or NVML when nvidia-smi is not
    installed; GpuIdentityUnknown says why neither worked."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return _nvml_listing()
    try:
        done = subprocess.run([exe, "-L"], capture_output=True, text=True,
                              timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GpuIdentityUnknown(f"{exe} -L did not answer: {exc}") from None
    gpus = parse_nvidia_smi_list(done.stdout)
    if done.returncode != 0 or not gpus:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise GpuIdentityUnknown(f"{exe} -L exited {done.returncode}"
                                 f"{': ' + said[0] if said else ' listing no GPU'}")
    return gpus


def _nvml_listing() -> list[PhysicalGpu]:
    try:
        import pynvml
    except ImportError:
        raise GpuIdentityUnknown("no nvidia-smi on PATH and no pynvml installed") from None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # no driver library: pynvml's error types vary by version
        raise GpuIdentityUnknown(f"no nvidia-smi on PATH and NVML did not start: {exc}") from None
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            migs = []
            with contextlib.suppress(Exception):  # not MIG-capable, or MIG off
                if pynvml.nvmlDeviceGetMigMode(handle)[0]:
                    for slot in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                        with contextlib.suppress(Exception):  # an empty slot
                            mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
                            migs.append(_text(pynvml.nvmlDeviceGetUUID(mig)))
            gpus.append(PhysicalGpu(_text(pynvml.nvmlDeviceGetName(handle)),
                                    _text(pynvml.nvmlDeviceGetUUID(handle)), tuple(migs)))
        return gpus
    except Exception as exc:
        raise GpuIdentityUnknown(f"NVML could not list the GPUs: {exc}") from None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def gpu_identities(env: Mapping[str, str] | None = None) -> list[str]:
    """This process's CUDA ordinals → physical identities (see :func:`cuda_identities`)."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    order = env.get("CUDA_DEVICE_ORDER")
    try:
        gpus = read_gpu_listing()
    except GpuIdentityUnknown as no_listing:
        if visible is None:
            raise
        try:  # whole UUIDs in the variable need no listing
            return cuda_identities(visible, None, order)
        except GpuIdentityUnknown as exc:
            raise GpuIdentityUnknown(f"{no_listing}; {exc}") from None
    return cuda_identities(visible, gpus, order)


