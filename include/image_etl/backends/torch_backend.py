"""PyTorch through Ultralytics' AutoBackend: every device; fp32, and fp16 on CUDA.

The batch goes through Ultralytics' predictor steps (uint8 to the device, NHWC → NCHW,
BGR → RGB, scaled to [0, 1] in the model's dtype), so the exact mode's forward pass is
Ultralytics' own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PACKAGE = "torch"
WHERE = "every device"


def available() -> bool:
    return True  # the engine's own dependency


def runs_on(device: str) -> bool:
    return True


def precisions(device: str) -> tuple[str, ...]:
    return ("fp32", "fp16") if device == "cuda" else ("fp32",)


def load(autobackend: Any, *, device: Any, path: Path, sha256: str, precision: str,
         imgsz: int) -> TorchBackend:
    return TorchBackend(autobackend, device, fp16=precision == "fp16")


class TorchBackend:
    runtime = "torch"

    def __init__(self, autobackend: Any, device: Any, fp16: bool) -> None:
        self.autobackend = autobackend  # ultralytics.nn.autobackend.AutoBackend
        self.device = device  # torch.device
        self.fp16 = fp16

    def infer(self, batch: np.ndarray) -> Any:
        import torch

        arr = torch.from_numpy(batch)
        if self.device.type == "cuda":
            arr = arr.pin_memory()
        im = arr.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
        im = im.flip(1)  # BGR → RGB
        im = (im.half() if self.fp16 else im.float()).div_(255)
        return self.autobackend(im)

    def share_cpu(self, cores: int, decode_threads: int) -> int | None:
        """On a CPU device the model competes with the decode threads for the same cores: it
        gets the cores the decoders leave (at least one) instead of oversubscribing them."""
        if self.device.type == "cuda":
            return None
        import torch

        # From the configured decode threads, not those this attempt runs: a retry with a
        # few images left must not get more threads (other numbers) than the first attempt.
        threads = max(1, cores - decode_threads)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return threads

    def warmup(self, hw: tuple[int, int]) -> None:
        if self.device.type == "cuda":
            self.autobackend.warmup(imgsz=(1, 3, *hw))
