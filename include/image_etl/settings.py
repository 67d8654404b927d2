"""One validated, frozen settings object for inference, from DAG params, CLI flags or env.

Validation happens here, before any work starts, and every error names the parameter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any


class SettingsError(ValueError):
    """A parameter is invalid; the message starts with the parameter's name."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name


def _number(name: str, value: Any, kind: type, lo: float, hi: float) -> Any:
    if isinstance(value, bool) or value is None:
        raise SettingsError(name, f"expected a {kind.__name__}, got {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise SettingsError(name, f"expected a {kind.__name__}, got {value!r}") from None
    if kind is int and isinstance(value, float) and value != number:
        raise SettingsError(name, f"expected a whole number, got {value!r}")
    if not lo <= number <= hi:
        raise SettingsError(name, f"must be between {lo} and {hi}, got {value!r}")
    return number


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on", "0", "false",
                                                            "no", "off"}:
        return value.strip().lower() in {"1", "true", "yes", "on"}
    raise SettingsError(name, f"expected true or false, got {value!r}")


@dataclasses.dataclass(frozen=True)
class InferSettings:
    """What one worker needs to turn images into detections.

    ``imgsz`` None means the model's own training size. ``decode_workers`` None means one per
    CPU core. Queue sizes bound memory: each decoded item is a letterboxed model input (plus
    the full image only when annotated images are on).
    """

    imgsz: int | None = None
    conf: float = 0.25
    iou: float = 0.7
    batch_size: int = 8
    max_det: int = 300
    fast_decode: bool = False
    save_annotated: bool = False
    half: bool | None = None
    decode_workers: int | None = None
    decoded_queue_size: int | None = None
    write_queue_size: int = 64
    max_image_pixels: int = 400_000_000
    progress_every_s: float = 15.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.imgsz is not None:
            size = _number("imgsz", self.imgsz, int, 32, 8192)
            if size % 32:
                raise SettingsError("imgsz", f"must be a multiple of 32, got {size}")
            set_(self, "imgsz", size)
        set_(self, "conf", _number("conf", self.conf, float, 0.0, 1.0))
        set_(self, "iou", _number("iou", self.iou, float, 0.0, 1.0))
        set_(self, "batch_size", _number("batch_size", self.batch_size, int, 1, 1024))
        set_(self, "max_det", _number("max_det", self.max_det, int, 1, 100_000))
        set_(self, "fast_decode", _flag("fast_decode", self.fast_decode))
        set_(self, "save_annotated", _flag("save_annotated", self.save_annotated))
        if self.half is not None:
            set_(self, "half", _flag("half", self.half))
        if self.decode_workers is not None:
            set_(self, "decode_workers", _number("decode_workers", self.decode_workers, int, 1, 256))
        if self.decoded_queue_size is not None:
            set_(self, "decoded_queue_size",
                 _number("decoded_queue_size", self.decoded_queue_size, int, 1, 100_000))
        set_(self, "write_queue_size", _number("write_queue_size", self.write_queue_size, int, 1,
                                               100_000))
        set_(self, "max_image_pixels", _number("max_image_pixels", self.max_image_pixels, int, 1,
                                               10**12))
        set_(self, "progress_every_s", _number("progress_every_s", self.progress_every_s, float,
                                               0.1, 86_400))

    def result_fingerprint(self, model_sha256: str, imgsz: int) -> str:
        """Hash of everything that changes detections: staged work is reusable only if equal."""
        key = {"model": model_sha256, "imgsz": imgsz, "conf": self.conf, "iou": self.iou,
               "max_det": self.max_det, "fast_decode": self.fast_decode}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def absolute_path(name: str, value: Any, allowed_roots: tuple[Path, ...] = ()) -> Path:
    """A parameter that must be an absolute path (under one of ``allowed_roots`` if given)."""
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise SettingsError(name, f"expected an absolute path, got {value!r}")
    path = Path(str(value).strip())
    if not path.is_absolute():
        raise SettingsError(name, f"must be an absolute path, got {str(path)!r}")
    resolved = Path(*path.parts)  # normalise separators without touching the filesystem
    if ".." in resolved.parts:
        raise SettingsError(name, f"must not contain '..', got {str(path)!r}")
    if allowed_roots and not any(resolved.is_relative_to(root) for root in allowed_roots):
        roots = ", ".join(str(r) for r in allowed_roots)
        raise SettingsError(name, f"{str(path)!r} is not under an allowed root ({roots})")
    return resolved
