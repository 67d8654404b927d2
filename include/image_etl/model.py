"""Load Ultralytics weights once per device, offline, through Ultralytics' own AutoBackend.

Using AutoBackend (what ``model.predict`` builds internally) keeps the exact mode's forward
pass identical to Ultralytics': same layer fusion, same dtype, same output layout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any

from image_etl.errors import ModelLoadError, WeightsChangedError
from image_etl.weights import check_weights_file, weights_sha256

os.environ.setdefault("YOLO_OFFLINE", "1")  # never reach for a hub, whatever imports first

log = logging.getLogger(__name__)

__all__ = ["ModelLoadError", "WeightsChangedError", "LoadedModel", "check_weights_file",
           "load_model", "weights_sha256"]


@dataclasses.dataclass
class LoadedModel:
    backend: Any  # ultralytics.nn.autobackend.AutoBackend
    device: Any  # torch.device
    path: Path
    sha256: str
    names: dict[int, str]
    stride: int
    default_imgsz: int
    fp16: bool  # the torch forward pass takes fp16 inputs
    end2end: bool
    runtime: str = "torch"  # what runs the forward pass: "torch" or "openvino" (CPU only)
    precision: str = "fp32"  # what it computes in: "fp32", "fp16" (CUDA) or "bf16" (OpenVINO)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def set_cpu_threads(self, threads: int) -> None:
        """Threads for the forward pass on a CPU device (the cores the decoders leave)."""
        if self.runtime == "openvino":
            self.backend.set_threads(threads)
            return
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def resolve_runtime(runtime: str, device: str) -> str:
    """``auto`` → OpenVINO on a CPU device when it is installed, PyTorch otherwise."""
    from image_etl import openvino_backend

    on_cpu = device == "cpu"
    if runtime == "auto":
        return "openvino" if on_cpu and openvino_backend.available() else "torch"
    if runtime == "openvino":
        if not on_cpu:
            raise ModelLoadError(f"runtime 'openvino' runs on CPU devices only, not on {device}")
        if not openvino_backend.available():
            raise ModelLoadError("runtime 'openvino' asked for, but the openvino package is not "
                                 "installed on this worker (pip install openvino)")
    return runtime


def resolve_precision(precision: str, device: str, runtime: str) -> str:
    """``auto`` → fp16 on CUDA, fp32 on a CPU; refuses what the device or runtime cannot do
    rather than quietly running something else."""
    if precision == "auto":
        return "fp16" if device == "cuda" else "fp32"
    if precision == "fp16" and device != "cuda":
        raise ModelLoadError("precision 'fp16' runs on CUDA devices only; on a CPU device use "
                             "'bf16' (with runtime openvino) or 'fp32'")
    if precision == "bf16" and (device != "cpu" or runtime != "openvino"):
        raise ModelLoadError(f"precision 'bf16' runs on CPU devices with runtime 'openvino', "
                             f"not on {device} with runtime {runtime!r}; on a GPU use 'fp16'")
    return precision


def read_model_info(path: str | Path) -> tuple[dict[int, str], int]:
    """Class names and training image size, without building the model on a device."""
    model = load_model(path, "cpu", warmup=False)
    return model.names, model.default_imgsz


def load_model(path: str | Path, device: str = "cpu", precision: str = "auto",
               warmup: bool = True, imgsz: int | str | None = None,
               runtime: str = "torch") -> LoadedModel:
    """Load ``path`` on ``device`` in ``precision`` (see :func:`resolve_precision`).

    ``runtime`` "openvino" (or "auto" on a CPU device) runs the forward pass with OpenVINO on
    an IR exported from the same weights; names, stride and identity still come from the .pt.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model weights not found: {path}")
    if path.suffix != ".pt":
        raise ModelLoadError(f"model weights must be an Ultralytics .pt file: {path}")
    check_weights_file(path)
    import torch
    from ultralytics.nn.autobackend import AutoBackend

    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device} requested but CUDA is not available here")
    runtime = resolve_runtime(runtime, torch_device.type)
    precision = resolve_precision(precision, torch_device.type, runtime)
    fp16 = precision == "fp16"
    sha = weights_sha256(path)
    try:
        backend = AutoBackend(model=str(path), device=torch_device, fp16=fp16, fuse=True,
                              verbose=False)
    except Exception as exc:  # corrupt pickle, wrong architecture, ... : say which file
        # One line: Ultralytics' messages run over several, with an "ERROR ❌️" prefix and advice
        # to download its own models (the full text stays in __cause__).
        lines = str(exc).strip().splitlines()
        reason = re.sub(r"^ERROR\s+[^\w\s/]*\s*", "", lines[0]).strip() if lines else ""
        raise ModelLoadError(f"cannot load model weights {path}: "
                             f"{reason or type(exc).__name__}") from exc
    backend.eval()
    if getattr(backend, "task", "detect") not in (None, "detect"):
        raise ModelLoadError(f"{path} is a {backend.task!r} model; this pipeline runs detection")
    train_args = getattr(getattr(backend, "model", None), "args", {}) or {}
    default_imgsz = train_args.get("imgsz", 640) if isinstance(train_args, dict) else 640
    if isinstance(default_imgsz, (list, tuple)):
        default_imgsz = max(default_imgsz)
    stride = int(max(backend.stride)) if hasattr(backend.stride, "__iter__") else int(backend.stride)
    names = {int(k): str(v) for k, v in dict(backend.names).items()}
    model = LoadedModel(backend=backend, device=torch_device, path=path, sha256=sha, names=names,
                        stride=stride, default_imgsz=int(default_imgsz), fp16=fp16,
                        end2end=bool(getattr(backend, "end2end", False)),
                        runtime=runtime, precision=precision)
    if model.runtime == "openvino":
        from image_etl import openvino_backend

        if precision == "bf16" and not openvino_backend.cpu_computes_bf16():
            raise ModelLoadError("precision 'bf16' needs a CPU with AVX512-BF16 or AMX, which "
                                 "this worker's CPU lacks; use 'fp32'")
        try:
            xml = openvino_backend.exported_model(path, sha, model.default_imgsz)
            model.backend = openvino_backend.OpenVINOBackend(xml, precision)
        except Exception as exc:  # unwritable cache, a layer the exporter cannot convert, ...
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ModelLoadError(f"cannot prepare the OpenVINO copy of {path} under "
                                 f"{openvino_backend.cache_root()} (IMAGE_ETL_CACHE_DIR): {why}; "
                                 "runtime 'torch' needs no copy") from exc
    if warmup and model.is_cuda:
        from image_etl.settings import size_hw

        h, w = size_hw(imgsz or model.default_imgsz) or (model.default_imgsz,) * 2
        backend.warmup(imgsz=(1, 3, -(-h // stride) * stride, -(-w // stride) * stride))
    log.info("loaded %s (sha256 %s…, %d classes) on %s in %s with %s", path.name, sha[:12],
             len(names), device, precision, model.runtime)
    return model
