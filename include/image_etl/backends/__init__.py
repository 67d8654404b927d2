"""What runs a model's forward pass: one interface (:class:`Backend`), one module per runtime.

A backend takes a batch as the decoders make it (letterboxed uint8 BGR images, NHWC numpy) and
returns Ultralytics' raw predictions (a torch tensor) for NMS; it takes its share of the CPU
beside the decode threads; its module says where it runs, in which precisions, and loads it.
The forward step and the worker see only this interface: another runtime (TensorRT, say) is
one more module here and one more entry in :data:`RUNTIMES`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from image_etl.errors import ModelLoadError

if TYPE_CHECKING:
    import numpy as np

# The runtimes, in the order ``auto`` tries them on a device: the first that runs there and
# is installed.
RUNTIMES = ("openvino", "torch")


class Backend(Protocol):
    """A loaded model's forward pass (see the module docstring)."""

    runtime: str  # its name, as the settings and the staging file write it

    def infer(self, batch: np.ndarray) -> Any:
        """uint8 NHWC BGR letterboxed images → raw predictions (a torch tensor), in order."""

    def share_cpu(self, cores: int, decode_threads: int) -> int | None:
        """Take the inference threads due beside ``decode_threads`` decoders on ``cores``
        cores; the count taken, or None where inference does not run on the CPU."""

    def warmup(self, hw: tuple[int, int]) -> None:
        """One forward pass at the input size (h, w), where the device gains from it."""


class BackendModule(Protocol):
    """What a runtime's module offers (``backends/<runtime>_backend.py``)."""

    PACKAGE: str  # what ``pip install`` adds where it is missing
    WHERE: str  # the devices it runs on, in words ("CPU devices only")

    def available(self) -> bool: ...

    def runs_on(self, device: str) -> bool: ...

    def precisions(self, device: str) -> tuple[str, ...]: ...

    def load(self, autobackend: Any, *, device: Any, path: Path, sha256: str, precision: str,
             imgsz: int) -> Backend: ...


def backend_module(runtime: str) -> BackendModule:
    if runtime not in RUNTIMES:
        raise ModelLoadError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    module: ModuleType = importlib.import_module(f"image_etl.backends.{runtime}_backend")
    return module


def resolve_runtime(runtime: str, device: str) -> str:
    """``auto`` → OpenVINO on a CPU device when it is installed, PyTorch otherwise; a runtime
    asked for by name is refused where it cannot run."""
    if runtime == "auto":
        return next(name for name in RUNTIMES
                    if backend_module(name).runs_on(device) and backend_module(name).available())
    module = backend_module(runtime)
    if not module.runs_on(device):
        raise ModelLoadError(f"runtime {runtime!r} runs on {module.WHERE}, not on {device}")
    if not module.available():
        raise ModelLoadError(f"runtime {runtime!r} asked for, but the {module.PACKAGE} package is "
                             f"not installed on this worker (pip install {module.PACKAGE})")
    return runtime


# What to say of a precision a device or runtime does not compute in (what to use instead).
_REFUSALS = {
    "fp16": "precision 'fp16' runs on CUDA devices only; on a CPU device use 'bf16' (with "
            "runtime openvino) or 'fp32'",
    "bf16": "precision 'bf16' runs on CPU devices with runtime 'openvino', not on {device} with "
            "runtime {runtime!r}; on a GPU use 'fp16'",
}


def resolve_precision(precision: str, device: str, runtime: str) -> str:
    """``auto`` → fp16 on CUDA, fp32 on a CPU; refuses what the device or runtime cannot do
    rather than quietly running something else."""
    if precision == "auto":
        return "fp16" if device == "cuda" else "fp32"
    if precision not in backend_module(runtime).precisions(device):
        why = _REFUSALS.get(precision, "precision {precision!r} does not run on {device} with "
                                       "runtime {runtime!r}")
        raise ModelLoadError(why.format(precision=precision, device=device, runtime=runtime))
    return precision


def load_backend(runtime: str, autobackend: Any, *, device: Any, path: Path, sha256: str,
                 precision: str, imgsz: int) -> Backend:
    """The ``runtime``'s backend for the weights ``autobackend`` was built from."""
    return backend_module(runtime).load(autobackend, device=device, path=path, sha256=sha256,
                                        precision=precision, imgsz=imgsz)
