"""Load Ultralytics weights once per device, offline, through Ultralytics' own AutoBackend.

Using AutoBackend (what ``model.predict`` builds internally) keeps the exact mode's forward
pass identical to Ultralytics': same layer fusion, same dtype, same output layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")  # never reach for a hub, whatever imports first

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The weights file cannot be used; the message names the file and why."""


def weights_sha256(path: str | Path) -> str:
    """A model's identity in the results database: the sha256 of its weights file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass
class LoadedModel:
    backend: Any  # ultralytics.nn.autobackend.AutoBackend
    device: Any  # torch.device
    path: Path
    sha256: str
    names: dict[int, str]
    stride: int
    default_imgsz: int
    fp16: bool
    end2end: bool

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def read_model_info(path: str | Path) -> tuple[dict[int, str], int]:
    """Class names and training image size, without building the model on a device."""
    model = load_model(path, "cpu", warmup=False)
    return model.names, model.default_imgsz


def load_model(path: str | Path, device: str = "cpu", half: bool | None = None,
               warmup: bool = True, imgsz: int | None = None) -> LoadedModel:
    """Load ``path`` on ``device`` (fp16 on CUDA unless ``half`` is False)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model weights not found: {path}")
    if path.suffix != ".pt":
        raise ModelLoadError(f"model weights must be an Ultralytics .pt file: {path}")
    import torch
    from ultralytics.nn.autobackend import AutoBackend

    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device} requested but CUDA is not available here")
    fp16 = (torch_device.type == "cuda") if half is None else bool(half and torch_device.type == "cuda")
    sha = weights_sha256(path)
    try:
        backend = AutoBackend(model=str(path), device=torch_device, fp16=fp16, fuse=True,
                              verbose=False)
    except Exception as exc:  # corrupt pickle, wrong architecture, ... : say which file
        raise ModelLoadError(f"cannot load model weights {path}: {type(exc).__name__}: {exc}") from exc
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
                        end2end=bool(getattr(backend, "end2end", False)))
    if warmup and model.is_cuda:
        size = imgsz or model.default_imgsz
        backend.warmup(imgsz=(1, 3, size, size))
    log.info("loaded %s (sha256 %s…, %d classes) on %s%s", path.name, sha[:12], len(names),
             device, " fp16" if fp16 else "")
    return model
