"""One validated, frozen settings object for inference, from DAG params, CLI flags or env.

Validation happens here, before any work starts, and every error names the parameter.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class SettingsError(ValueError):
    """A parameter is invalid; the message starts with the parameter's name."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name


def check_number(name: str, value: Any, kind: type, lo: float, hi: float) -> Any:
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


RUNTIMES = ("auto", "torch", "openvino")


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
    runtime: str = "auto"  # auto: OpenVINO on a CPU device when installed, else PyTorch
    half: bool | None = None
    decode_workers: int | None = None
    decoded_queue_size: int | None = None
    write_queue_size: int = 64
    max_image_pixels: int = 400_000_000
    progress_every_s: float = 15.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.imgsz is not None:
            size = check_number("imgsz", self.imgsz, int, 32, 8192)
            if size % 32:
                raise SettingsError("imgsz", f"must be a multiple of 32, got {size}")
            set_(self, "imgsz", size)
        set_(self, "conf", check_number("conf", self.conf, float, 0.0, 1.0))
        set_(self, "iou", check_number("iou", self.iou, float, 0.0, 1.0))
        set_(self, "batch_size", check_number("batch_size", self.batch_size, int, 1, 1024))
        set_(self, "max_det", check_number("max_det", self.max_det, int, 1, 100_000))
        set_(self, "fast_decode", _flag("fast_decode", self.fast_decode))
        set_(self, "save_annotated", _flag("save_annotated", self.save_annotated))
        if self.runtime not in RUNTIMES:
            raise SettingsError("runtime", f"expected one of {', '.join(RUNTIMES)}, got "
                                f"{self.runtime!r}")
        if self.half is not None:
            set_(self, "half", _flag("half", self.half))
        if self.decode_workers is not None:
            set_(self, "decode_workers",
                 check_number("decode_workers", self.decode_workers, int, 1, 256))
        if self.decoded_queue_size is not None:
            set_(self, "decoded_queue_size",
                 check_number("decoded_queue_size", self.decoded_queue_size, int, 1, 100_000))
        set_(self, "write_queue_size",
             check_number("write_queue_size", self.write_queue_size, int, 1, 100_000))
        set_(self, "max_image_pixels",
             check_number("max_image_pixels", self.max_image_pixels, int, 1, 10**12))
        set_(self, "progress_every_s",
             check_number("progress_every_s", self.progress_every_s, float, 0.1, 86_400))

    def result_fingerprint(self, model_sha256: str, imgsz: int, runtime: str = "torch") -> str:
        """Hash of everything that changes detections: staged work is reusable only if equal.

        ``runtime`` is the one actually used (never "auto"): PyTorch and OpenVINO agree only to
        float rounding, and a retry must not mix the two in one shard.
        """
        key = {"model": model_sha256, "imgsz": imgsz, "conf": self.conf, "iou": self.iou,
               "max_det": self.max_det, "fast_decode": self.fast_decode}
        if runtime != "torch":  # keeps the fingerprints of existing staged work valid
            key["runtime"] = runtime
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


# --- a whole run: what the DAG's params (or the CLI) ask for ------------------------------

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = PROJECT_ROOT / "models" / "demo-yolo11n-2cls.pt"


def env_defaults(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Param defaults a deployment sets once through the environment (IMAGE_ETL_*)."""
    env = os.environ if env is None else env
    return {
        "drop_dir": env.get("IMAGE_ETL_DROP_DIR", "/data/drops/{date}"),
        "output_dir": env.get("IMAGE_ETL_OUTPUT_DIR", "/data/outputs/{model}/{date}"),
        "model_path": env.get("IMAGE_ETL_MODEL", str(DEMO_MODEL)),
        "devices": env.get("IMAGE_ETL_DEVICES", "auto"),
        "imgsz": int(env["IMAGE_ETL_IMGSZ"]) if env.get("IMAGE_ETL_IMGSZ") else None,
        "conf": float(env.get("IMAGE_ETL_CONF", 0.25)),
        "iou": float(env.get("IMAGE_ETL_IOU", 0.7)),
        "batch_size": int(env.get("IMAGE_ETL_BATCH_SIZE", 8)),
        "fast_decode": env.get("IMAGE_ETL_FAST_DECODE", "false").lower() in {"1", "true", "yes"},
        "save_annotated": env.get("IMAGE_ETL_SAVE_ANNOTATED", "false").lower() in {"1", "true", "yes"},
        "runtime": env.get("IMAGE_ETL_RUNTIME", "auto"),
        "settle_seconds": float(env.get("IMAGE_ETL_SETTLE_SECONDS", 60)),
        "max_failed_fraction": float(env.get("IMAGE_ETL_MAX_FAILED_FRACTION", 0.5)),
        "schedule": env.get("IMAGE_ETL_SCHEDULE", "0 2 * * *"),
        "allowed_roots": tuple(Path(p) for p in env.get("IMAGE_ETL_ALLOWED_ROOTS", "").split(":") if p),
    }


def _fill(template: str, drop_date: dt.date, model: Path) -> str:
    # Plain replacement, not str.format: a path may legitimately contain other braces.
    return template.replace("{date}", drop_date.isoformat()).replace("{model}", model.stem)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    drop_date: dt.date
    drop_dir: Path
    output_dir: Path
    model_path: Path
    devices: str
    infer: InferSettings
    reprocess: bool = False
    settle_seconds: float = 60.0
    max_failed_fraction: float = 0.5

    @classmethod
    def from_params(cls, params: Mapping[str, Any], run_date: dt.date,
                    allowed_roots: tuple[Path, ...] = ()) -> RunSettings:
        """Validate DAG params / CLI options; raise SettingsError naming the first bad one."""
        known = {"date", "drop_dir", "output_dir", "model_path", "devices", "imgsz", "conf", "iou",
                 "batch_size", "fast_decode", "save_annotated", "runtime", "reprocess",
                 "settle_seconds", "max_failed_fraction"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise SettingsError(unknown[0], f"unknown parameter (known: {', '.join(sorted(known))})")
        raw_date = params.get("date")
        if raw_date in (None, ""):
            drop_date = run_date
        else:
            try:
                drop_date = dt.date.fromisoformat(str(raw_date).strip())
            except ValueError:
                raise SettingsError("date", f"expected YYYY-MM-DD or empty, got {raw_date!r}") from None
        model_path = absolute_path("model_path", params.get("model_path"), allowed_roots)
        if not model_path.is_file():
            raise SettingsError("model_path", f"no such file: {model_path}")
        if model_path.suffix != ".pt":
            raise SettingsError("model_path", f"expected an Ultralytics .pt file, got {model_path.name}")
        drop_dir = absolute_path("drop_dir", _fill(str(params.get("drop_dir") or ""), drop_date,
                                                   model_path), allowed_roots)
        output_dir = absolute_path("output_dir", _fill(str(params.get("output_dir") or ""),
                                                       drop_date, model_path), allowed_roots)
        devices = params.get("devices") or "auto"
        if isinstance(devices, (list, tuple)):
            devices = ",".join(str(d) for d in devices)
        if not isinstance(devices, str):
            raise SettingsError("devices", f"expected text like 'auto', 'cpu' or '0,1', got {devices!r}")
        infer = InferSettings(imgsz=params.get("imgsz") or None, conf=params.get("conf", 0.25),
                              iou=params.get("iou", 0.7), batch_size=params.get("batch_size", 8),
                              fast_decode=params.get("fast_decode", False),
                              save_annotated=params.get("save_annotated", False),
                              runtime=params.get("runtime") or "auto")
        return cls(drop_date=drop_date, drop_dir=drop_dir, output_dir=output_dir,
                   model_path=model_path, devices=devices, infer=infer,
                   reprocess=_flag("reprocess", params.get("reprocess", False)),
                   settle_seconds=check_number("settle_seconds",
                                               params.get("settle_seconds", 60.0), float, 0, 86_400),
                   max_failed_fraction=check_number("max_failed_fraction",
                                                    params.get("max_failed_fraction", 0.5),
                                                    float, 0, 1))

    def to_dict(self) -> dict[str, Any]:
        return {"date": self.drop_date.isoformat(), "drop_dir": str(self.drop_dir),
                "output_dir": str(self.output_dir), "model_path": str(self.model_path),
                "devices": self.devices, **{k: v for k, v in self.infer.to_dict().items()
                                            if k in {"imgsz", "conf", "iou", "batch_size",
                                                     "fast_decode", "save_annotated",
                                                     "runtime"}},
                "reprocess": self.reprocess, "settle_seconds": self.settle_seconds,
                "max_failed_fraction": self.max_failed_fraction}
