"""Load Ultralytics weights once per device, offline, through Ultralytics' own AutoBackend.

Using AutoBackend (what ``model.predict`` builds internally) keeps the exact mode's forward
pass identical to Ultralytics': same layer fusion, same dtype, same output layout.

Weights are code: a ``.pt`` file is a pickle, and a plain ``torch.load`` runs whatever it
names. Every checkpoint this process loads (ours, and the OpenVINO exporter's) goes through
Ultralytics' allow-listed loading (``ULTRALYTICS_SAFE_LOAD``: ``torch.load(weights_only=True)``
against its known model classes, no ``eval`` while building layers), unless the operator sets
``IMAGE_ETL_UNSAFE_WEIGHTS=1`` for weights they trust (README: "Model weights").
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any

from image_etl.backends import Backend, load_backend, resolve_precision, resolve_runtime
from image_etl.errors import ModelLoadError, WeightsChangedError
from image_etl.weights import check_weights_file, weights_sha256

os.environ.setdefault("YOLO_OFFLINE", "1")  # never reach for a hub, whatever imports first

log = logging.getLogger(__name__)

__all__ = ["ModelLoadError", "WeightsChangedError", "LoadedModel", "check_weights_file",
           "load_model", "weights_sha256", "UNSAFE_WEIGHTS_ENV", "resolve_precision",
           "resolve_runtime"]

UNSAFE_WEIGHTS_ENV = "IMAGE_ETL_UNSAFE_WEIGHTS"


def unsafe_weights_allowed() -> bool:
    """Whether the operator turned allow-listed loading off (``IMAGE_ETL_UNSAFE_WEIGHTS``)."""
    value = os.environ.get(UNSAFE_WEIGHTS_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ModelLoadError(f"{UNSAFE_WEIGHTS_ENV}={value!r}: expected 1 or 0")


def use_safe_loading(safe: bool) -> None:
    """Turn Ultralytics' allow-listed checkpoint loading on (or off) for this process.

    Ultralytics reads ``ULTRALYTICS_SAFE_LOAD`` once, when it is first imported, into
    ``ultralytics.nn.tasks.SAFE_LOAD``, which every load (AutoBackend's, ``YOLO()``'s in the
    exporter) consults: set both, since something may have imported it already.
    """
    import torch

    if safe and not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        # Ultralytics would quietly fall back to a plain (unsafe) load on such a torch.
        raise ModelLoadError(f"allow-listed weights loading needs torch >= 2.6, this worker has "
                             f"{torch.__version__}")
    os.environ["ULTRALYTICS_SAFE_LOAD"] = "1" if safe else "0"
    from ultralytics.nn import tasks

    tasks.SAFE_LOAD = safe


def _refused_globals(exc: BaseException) -> list[str] | None:
    """The globals allow-listed loading refused, if that is what ``exc`` (or its cause) is."""
    import pickle

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, pickle.UnpicklingError):
            return sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(seen))))
        seen = seen.__cause__ or seen.__context__
    return None


@dataclasses.dataclass
class LoadedModel:
    backend: Backend  # runs the forward pass (image_etl.backends)
    device: Any  # torch.device
    path: Path
    sha256: str
    names: dict[int, str]
    stride: int
    default_imgsz: int
    fp16: bool  # the forward pass takes fp16 inputs
    end2end: bool
    runtime: str = "torch"  # what runs the forward pass: "torch" or "openvino" (CPU only)
    precision: str = "fp32"  # what it computes in: "fp32", "fp16" (CUDA) or "bf16" (OpenVINO)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


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
    safe = not unsafe_weights_allowed()
    if not safe:
        log.warning("%s is set: %s is unpickled without an allow-list (any code in it runs)",
                    UNSAFE_WEIGHTS_ENV, path)
    use_safe_loading(safe)
    try:
        autobackend = AutoBackend(model=str(path), device=torch_device, fp16=fp16, fuse=True,
                                  verbose=False)
    except Exception as exc:  # corrupt pickle, wrong architecture, ... : say which file
        refused = _refused_globals(exc) if safe else None
        if refused is not None:
            raise ModelLoadError(
                f"model weights {path} refused by allow-listed loading: the checkpoint names "
                f"{', '.join(refused) or 'objects'} outside Ultralytics' known model classes, "
                "so it was not unpickled and nothing in it ran. If the file comes from a source "
                f"you trust, see README 'Model weights' ({UNSAFE_WEIGHTS_ENV})") from exc
        # One line: Ultralytics' messages run over several, with an "ERROR ❌️" prefix and advice
        # to download its own models (the full text stays in __cause__).
        lines = str(exc).strip().splitlines()
        reason = re.sub(r"^ERROR\s+[^\w\s/]*\s*", "", lines[0]).strip() if lines else ""
        raise ModelLoadError(f"cannot load model weights {path}: "
                             f"{reason or type(exc).__name__}") from exc
    autobackend.eval()
    if getattr(autobackend, "task", "detect") not in (None, "detect"):
        raise ModelLoadError(f"{path} is a {autobackend.task!r} model; this pipeline runs detection")
    train_args = getattr(getattr(autobackend, "model", None), "args", {}) or {}
    default_imgsz = train_args.get("imgsz", 640) if isinstance(train_args, dict) else 640
    if isinstance(default_imgsz, (list, tuple)):
        default_imgsz = max(default_imgsz)
    strides = autobackend.stride
    stride = int(max(strides)) if hasattr(strides, "__iter__") else int(strides)
    names = {int(k): str(v) for k, v in dict(autobackend.names).items()}
    runner = load_backend(runtime, autobackend, device=torch_device, path=path, sha256=sha,
                          precision=precision, imgsz=int(default_imgsz))
    model = LoadedModel(backend=runner, device=torch_device, path=path, sha256=sha, names=names,
                        stride=stride, default_imgsz=int(default_imgsz), fp16=fp16,
                        end2end=bool(getattr(autobackend, "end2end", False)),
                        runtime=runtime, precision=precision)
    if warmup:
        from image_etl.sizes import size_hw, stride_multiple

        hw = size_hw(imgsz or model.default_imgsz) or (model.default_imgsz,) * 2
        runner.warmup(stride_multiple(hw, stride))
    log.info("loaded %s (sha256 %s…, %d classes) on %s in %s with %s", path.name, sha[:12],
             len(names), device, precision, model.runtime)
    return model
