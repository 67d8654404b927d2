"""Every parameter declared once, and the validated, frozen settings built from them.

``SETTINGS`` is the one declaration: name, type, default, bounds, title, description, form
section, environment variable and CLI flag of each parameter (a ``Setting``, in
``image_etl.setting``, which derives from one row its msgspec type, its JSON schema and its
messages). The DAG's ``Param`` objects (``json_schema``), the CLI's flags and help
(``cli.py``), the deployment's ``IMAGE_ETL_*`` defaults (``env_defaults``) and the validation
with its ``invalid parameter NAME: ...`` messages (``check``) are all derived from it.

Standard library and msgspec only: the DAG file imports this module at parse time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from image_etl.errors import SettingsError
from image_etl.setting import Setting, absolute_path
from image_etl.sizes import MAX_SIDE, MIN_SIDE, REFERENCE_FRAME_HW, size_hw, slice_count
from image_etl.storage.location import ObjectLocation, is_url, parse_object_url

__all__ = ["SETTINGS", "DAG_PARAMS", "SettingsError", "Setting", "InferSettings",
           "check", "env_defaults", "absolute_path", "size_hw", "MIN_SIDE", "MAX_SIDE",
           "MAX_SLICES_PER_IMAGE", "REFERENCE_FRAME_HW"]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = PROJECT_ROOT / "models" / "demo-yolo11n-2cls.pt"
RUNTIMES = ("auto", "torch", "openvino")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
MERGES = ("greedynmm", "nmm", "nms")  # as image_etl.slicing (not imported: it needs numpy)
METRICS = ("ios", "iou")
DROP_WAIT_ACTIONS = ("fail", "proceed")
# A marker: one file name in the drop folder (no folder part, not '.' or '..'). Empty: off.
MARKER_PATTERN = r"^(?!\.{1,2}$)[^/\\]*$"
# devices: 'auto', or a list of 'cpu', GPU indices and 'cuda:N' (e.g. 'cpu,cpu', '0,1').
DEVICES_PATTERN = r"^\s*(auto|(cpu|cuda:\d+|\d+)(\s*,\s*(cpu|cuda:\d+|\d+))*)\s*$"

_S = "What to process"
_SL = "Slicing"
_M = "Model"
_C = "Compute"
_O = "Outputs"

SETTINGS: dict[str, Setting] = {s.name: s for s in (
    # --- a run: the DAG's params ------------------------------------------------------------
    Setting("date", str, None, "Drop date", nullable=True, format="date", section=_S,
            description="YYYY-MM-DD. Empty: the run's date (its logical date, or when it was "
                        "triggered if it has none) plus the drop date offset."),
    Setting("drop_date_offset_days", int, 0, "Drop date offset (days)", section=_S,
            env="IMAGE_ETL_DROP_DATE_OFFSET_DAYS", minimum=-31, maximum=31,
            description="Added to the run's date when Drop date is empty. 0: the run at D "
                        "02:00 processes drop D. -1: it processes D-1, for drops named by "
                        "the day they were captured."),
    Setting("drop_dir", str, "/data/drops/{date}", "Drop folder", section=_S,
            env="IMAGE_ETL_DROP_DIR",
            description="Absolute path, or s3://[conn_id@]bucket/prefix (object storage, "
                        "through that Airflow connection); {date} is replaced by the drop "
                        "date."),
    Setting("output_dir", str, "/data/outputs/{model}/{date}", "Output folder", section=_S,
            env="IMAGE_ETL_OUTPUT_DIR",
            description="Absolute path or s3://[conn_id@]bucket/prefix for labels/, "
                        "annotated/ and run files; {date} and "
                        "{model} (weights file name + first 8 hex digits of its sha256) are "
                        "replaced."),
    Setting("reprocess", bool, False, "Reprocess", section=_S,
            description="Also process images already loaded for this model (their rows are "
                        "replaced, never duplicated)."),
    Setting("catchup_nights", int, 2, "Catch-up nights", section=_S,
            env="IMAGE_ETL_CATCHUP_NIGHTS", minimum=0, maximum=31,
            description="Also look back over this many earlier nights for images not yet "
                        "loaded with this model and these result settings (files still being "
                        "written when their night ran, or copied in later) and load them into "
                        "their own night. 0: off. Needs {date} in the drop folder."),
    Setting("model_path", str, str(DEMO_MODEL), "Model weights", section=_M, env="IMAGE_ETL_MODEL",
            description="Absolute path to an Ultralytics .pt file (never downloaded), under one "
                        "of the deployment's model folders (IMAGE_ETL_MODEL_ROOTS)."),
    Setting("imgsz", int, None, "Image size", section=_M, env="IMAGE_ETL_IMGSZ", cli="--imgsz",
            nullable=True, minimum=MIN_SIDE, maximum=MAX_SIDE, sizes=True,
            pattern_hint="use a number like 640 or HEIGHTxWIDTH like 12000x2048",
            description="Model input size: 640, or HEIGHTxWIDTH (e.g. 12000x2048) for a model "
                        "trained at high resolution, each side rounded up to the model's "
                        "stride as Ultralytics does; empty = the model's own."),
    Setting("conf", float, 0.25, "Confidence threshold", section=_M, env="IMAGE_ETL_CONF",
            cli="--conf", minimum=0, maximum=1),
    Setting("iou", float, 0.7, "NMS IoU threshold", section=_M, env="IMAGE_ETL_IOU", cli="--iou",
            minimum=0, maximum=1),
    Setting("devices", str, "auto", "Devices", section=_C, env="IMAGE_ETL_DEVICES", cli="--device",
            pattern=DEVICES_PATTERN,
            pattern_hint="use 'auto', 'cpu', 'cpu,cpu', GPU indices like '0,1' or 'cuda:0,cuda:1'",
            description="'auto' (every GPU, else one CPU worker), 'cpu', 'cpu,cpu', GPU "
                        "indices '0,1' or 'cuda:0,cuda:1'. One mapped infer task per device."),
    Setting("batch_size", int, 8, "Batch size", section=_C, env="IMAGE_ETL_BATCH_SIZE",
            cli="--batch", minimum=1, maximum=1024,
            description="Images per forward pass (halved automatically on GPU out-of-memory)."),
    Setting("fast_decode", bool, False, "Fast decode", section=_C, env="IMAGE_ETL_FAST_DECODE",
            cli="--fast-decode",
            description="Reduced-scale JPEG decode when the model input is much smaller than "
                        "the image (2-8x faster, pixels differ slightly)."),
    Setting("runtime", str, "auto", "Runtime", section=_C, env="IMAGE_ETL_RUNTIME", cli="--runtime",
            enum=RUNTIMES,
            description="Forward pass on CPU devices: 'auto' uses OpenVINO when installed "
                        "(about half the CPU time of PyTorch, same detections to float "
                        "rounding); GPUs always run PyTorch."),
    Setting("precision", str, "auto", "Precision", section=_C, env="IMAGE_ETL_PRECISION",
            cli="--precision", enum=PRECISIONS,
            description="Number format of the forward pass. 'auto': fp16 on GPUs, fp32 on CPUs. "
                        "'bf16': CPU devices with OpenVINO, on CPUs with AMX or AVX512-BF16 "
                        "(about twice the slices per second; confidences move by ~0.01). "
                        "'fp16': GPUs only. 'fp32' anywhere."),
    Setting("timeout_per_image_s", float, 5.0, "Time limit per image (s)", section=_C,
            env="IMAGE_ETL_TIMEOUT_PER_IMAGE_S", minimum=0.01, maximum=3600,
            description="infer's execution_timeout is 15 minutes (model load) plus this for "
                        "each image of its shard (in sliced mode, for each 8 slices of a "
                        "2048 x 12000 image): a stuck task is killed and frees its GPU."),
    Setting("slice_size", int, 0, "Slice size", section=_SL, env="IMAGE_ETL_SLICE_SIZE",
            cli="--slice-size", minimum=MIN_SIDE, maximum=MAX_SIDE, sizes=True, zero_is_off=True,
            pattern_hint="use 0 (off), a number like 640 or HEIGHTxWIDTH like 640x480",
            description="Sliced inference for small defects: the model runs on overlapping "
                        "native-resolution slices of this size (pixels, or HEIGHTxWIDTH) and "
                        "their boxes are merged per image, as SAHI does. 0: off (whole image). "
                        "At most MAX_SLICES_PER_IMAGE slices of a 2048 x 12000 image."),
    Setting("slice_overlap", float, 0.2, "Slice overlap", section=_SL,
            env="IMAGE_ETL_SLICE_OVERLAP", cli="--slice-overlap", minimum=0, maximum=0.9,
            description="Overlap of neighbouring slices, as a fraction of the slice size "
                        "(SAHI's overlap_height_ratio / overlap_width_ratio)."),
    Setting("full_image_pass", bool, True, "Full-image pass", section=_SL,
            env="IMAGE_ETL_FULL_IMAGE_PASS", cli="--full-image-pass",
            description="Also run the whole image once and merge its boxes with the slices' "
                        "(SAHI's perform_standard_pred): large defects stay found."),
    Setting("merge", str, "greedynmm", "Merge", section=_SL, env="IMAGE_ETL_MERGE",
            cli="--merge", enum=MERGES,
            description="How overlapping boxes of neighbouring slices become one: greedynmm "
                        "(merge into the best box), nmm (merge transitively) or nms (keep the "
                        "best only). SAHI's postprocess_type."),
    Setting("merge_metric", str, "ios", "Merge metric", section=_SL, env="IMAGE_ETL_MERGE_METRIC",
            cli="--merge-metric", enum=METRICS,
            description="ios: intersection over the smaller box; iou: intersection over union "
                        "(SAHI's postprocess_match_metric)."),
    Setting("merge_threshold", float, 0.5, "Merge threshold", section=_SL,
            env="IMAGE_ETL_MERGE_THRESHOLD", cli="--merge-threshold", minimum=0.01, maximum=1,
            description="Boxes whose metric reaches this are merged (SAHI's "
                        "postprocess_match_threshold)."),
    Setting("merge_class_agnostic", bool, False, "Merge across classes", section=_SL,
            env="IMAGE_ETL_MERGE_CLASS_AGNOSTIC", cli="--merge-class-agnostic",
            description="Merge overlapping boxes of different classes too (SAHI's "
                        "postprocess_class_agnostic)."),
    Setting("save_annotated", bool, False, "Save annotated images", section=_O,
            env="IMAGE_ETL_SAVE_ANNOTATED", cli="--save-annotated",
            description="Also write each image with its boxes drawn."),
    Setting("settle_seconds", float, 60.0, "Settle time (s)", section=_O,
            env="IMAGE_ETL_SETTLE_SECONDS", minimum=0, maximum=86400,
            description="Files modified more recently are still being written: left for the "
                        "next run."),
    Setting("max_failed_fraction", float, 0.5, "Max failed fraction", section=_O,
            env="IMAGE_ETL_MAX_FAILED_FRACTION", cli="--max-failed-fraction", minimum=0, maximum=1,
            description="Fail the run when more than this fraction of the drop's images could "
                        "not be read (their rows are loaded all the same)."),
    Setting("drop_ready_marker", str, None, "Drop-ready marker file", section=_S,
            env="IMAGE_ETL_DROP_READY_MARKER", nullable=True, pattern=MARKER_PATTERN,
            pattern_hint="a file name in the drop folder, like _SUCCESS or manifest.json",
            description="Empty: off. A file name (e.g. _SUCCESS): the run first waits, without "
                        "holding a worker slot, until this file exists in the drop folder."),
    Setting("drop_wait_timeout", float, 21600.0, "Drop wait limit (s)", section=_S,
            env="IMAGE_ETL_DROP_WAIT_TIMEOUT", minimum=0, maximum=7 * 86400,
            description="How long the run waits for the drop-ready marker (default 6 h)."),
    Setting("drop_wait_on_timeout", str, "fail", "When the marker does not come", section=_S,
            env="IMAGE_ETL_DROP_WAIT_ON_TIMEOUT", enum=DROP_WAIT_ACTIONS,
            description="fail: the run fails, naming the folder and the marker. proceed: the "
                        "run processes what is in the drop folder then."),
    # --- the engine only (CLI flags, tests, benchmarks) --------------------------------------
    Setting("max_det", int, 300, "Max detections per image", cli="--max-det", minimum=1,
            maximum=100_000),
    Setting("decode_workers", int, None, "Decode threads", cli="--decode-workers", nullable=True,
            minimum=1, maximum=256, description="Default: one per CPU core this process may use."),
    Setting("decoded_queue_size", int, None, "Decoded images in flight", nullable=True,
            minimum=1, maximum=100_000),
    Setting("write_queue_size", int, 64, "Results waiting for the writers", minimum=1,
            maximum=100_000),
    Setting("max_image_pixels", int, 400_000_000, "Largest image (pixels)", minimum=1,
            maximum=10**12),
    Setting("progress_every_s", float, 15.0, "Progress log interval (s)", minimum=0.1,
            maximum=86_400),
)}

DAG_PARAMS: tuple[str, ...] = tuple(name for name, s in SETTINGS.items() if s.section)

# The most slices one image may become: what the reference frame (a 2048 x 12000 line scan)
# gives at the smallest slice side and the default overlap (36,498). Bounds the work
# slice_size and slice_overlap can ask for together (32 px slices at overlap 0.9 would be
# 1.5 M per image).
MAX_SLICES_PER_IMAGE = slice_count(*REFERENCE_FRAME_HW, (MIN_SIDE, MIN_SIDE),
                                   SETTINGS["slice_overlap"].default)


def check_slice_work(slice_size: int | str, slice_overlap: float) -> None:
    """SettingsError naming slice_size when its slices of a reference frame are too many."""
    slice_hw = size_hw(slice_size)
    if slice_hw is None:
        return
    count = slice_count(*REFERENCE_FRAME_HW, slice_hw, slice_overlap)
    if count > MAX_SLICES_PER_IMAGE:
        raise SettingsError("slice_size", f"{slice_size} with slice_overlap {slice_overlap} "
                            f"makes {count:,} slices of a 2048 x 12000 image, more than "
                            f"MAX_SLICES_PER_IMAGE ({MAX_SLICES_PER_IMAGE:,}); use larger "
                            "slices or less overlap")


# --- validation (image_etl.setting: msgspec, with our messages) ----------------------------------

def check(name: str, value: Any) -> Any:
    """``value`` (from a form, conf, env or flag: strings are converted) as ``name`` wants it,
    or SettingsError naming ``name``."""
    return SETTINGS[name].check(value)


def storage_location(name: str, value: Any, allowed_roots: tuple[Path | ObjectLocation, ...] = ()
                     ) -> Path | ObjectLocation:
    """A folder parameter: an absolute path, or an object-storage URL
    (``s3://[conn_id@]bucket/prefix``); under one of ``allowed_roots`` if given."""
    if not (isinstance(value, str) and is_url(value)):
        return absolute_path(name, value, allowed_roots)
    try:
        location = parse_object_url(value)
    except ValueError as exc:  # StorageConfigError: its message names the URL, not a secret
        raise SettingsError(name, str(exc)) from None
    # A root that names a connection allows only that one (or the deployment's default):
    # whoever triggers a run must not reach an allowed bucket with another connection's
    # credentials.
    if allowed_roots and not any(location.is_relative_to(root)
                                 and (root.conn_id is None
                                      or location.conn_id in (None, root.conn_id))
                                 for root in allowed_roots if isinstance(root, ObjectLocation)):
        roots = ", ".join(str(r) for r in allowed_roots)
        raise SettingsError(name, f"{location.url!r} is not under an allowed root ({roots})")
    return location


def parse_allowed_roots(text: str) -> tuple[Path | ObjectLocation, ...]:
    """``IMAGE_ETL_ALLOWED_ROOTS``: roots separated by ``:``, each a path or an object URL
    (``/data:s3://drops/nightly``; the ``:`` of ``s3://`` does not separate)."""
    roots: list[Path | ObjectLocation] = []
    for part in re.split(r":(?!//)", text):
        part = part.strip()
        if not part:
            continue
        if is_url(part):
            try:
                roots.append(parse_object_url(part))
            except ValueError as exc:
                raise SettingsError("allowed_roots", f"{exc} (from IMAGE_ETL_ALLOWED_ROOTS)") from None
        else:
            roots.append(Path(part))
    return tuple(roots)


# --- defaults a deployment sets once (IMAGE_ETL_*) -------------------------------------------

def env_defaults(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Every parameter's default, from its ``IMAGE_ETL_*`` variable where set (checked: a bad
    value fails the DAG file's import naming the variable), plus the schedule and the roots."""
    env = os.environ if env is None else env
    defaults: dict[str, Any] = {}
    for name, spec in SETTINGS.items():
        raw = env.get(spec.env) if spec.env else None
        if raw is None:
            defaults[name] = spec.default
            continue
        try:
            defaults[name] = check(name, raw)
        except SettingsError as exc:
            raise SettingsError(name, f"{exc.problem} (from {spec.env})") from None
    try:
        check_slice_work(defaults["slice_size"], defaults["slice_overlap"])
    except SettingsError as exc:
        raise SettingsError(exc.name, f"{exc.problem} (from IMAGE_ETL_SLICE_SIZE and "
                            "IMAGE_ETL_SLICE_OVERLAP)") from None
    defaults["schedule"] = env.get("IMAGE_ETL_SCHEDULE", "0 2 * * *")
    defaults["allowed_roots"] = parse_allowed_roots(env.get("IMAGE_ETL_ALLOWED_ROOTS", ""))
    return defaults


# --- what one worker needs ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class InferSettings:
    """What one worker needs to turn images into detections (defaults: ``SETTINGS``).

    ``imgsz`` None means the model's own training size; an ``"HxW"`` text, a rectangle.
    ``decode_workers`` None means one per
    CPU core this process may use. Queue sizes bound memory: each decoded item is a
    letterboxed model input (plus the full image only when annotated images are on).
    """

    imgsz: int | str | None = SETTINGS["imgsz"].default
    conf: float = SETTINGS["conf"].default
    iou: float = SETTINGS["iou"].default
    batch_size: int = SETTINGS["batch_size"].default
    max_det: int = SETTINGS["max_det"].default
    fast_decode: bool = SETTINGS["fast_decode"].default
    save_annotated: bool = SETTINGS["save_annotated"].default
    runtime: str = SETTINGS["runtime"].default
    precision: str = SETTINGS["precision"].default
    decode_workers: int | None = SETTINGS["decode_workers"].default
    decoded_queue_size: int | None = SETTINGS["decoded_queue_size"].default
    write_queue_size: int = SETTINGS["write_queue_size"].default
    max_image_pixels: int = SETTINGS["max_image_pixels"].default
    progress_every_s: float = SETTINGS["progress_every_s"].default
    slice_size: int | str = SETTINGS["slice_size"].default
    slice_overlap: float = SETTINGS["slice_overlap"].default
    full_image_pass: bool = SETTINGS["full_image_pass"].default
    merge: str = SETTINGS["merge"].default
    merge_metric: str = SETTINGS["merge_metric"].default
    merge_threshold: float = SETTINGS["merge_threshold"].default
    merge_class_agnostic: bool = SETTINGS["merge_class_agnostic"].default

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, check(field.name, getattr(self, field.name)))
        check_slice_work(self.slice_size, self.slice_overlap)
        if self.sliced and self.fast_decode:
            raise SettingsError("fast_decode", "cannot be combined with slice_size: the slices "
                                "need the full-resolution image (turn one of them off)")

    @property
    def sliced(self) -> bool:
        return bool(self.slice_size)

    def slicing_key(self) -> dict[str, Any]:
        """The slicing settings that change detections (empty in whole-image mode)."""
        if not self.sliced:
            return {}
        return {"slice_size": self.slice_size, "slice_overlap": self.slice_overlap,
                "full_image_pass": self.full_image_pass, "merge": self.merge,
                "merge_metric": self.merge_metric, "merge_threshold": self.merge_threshold,
                "merge_class_agnostic": self.merge_class_agnostic}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> InferSettings:
        """The worker's part of a run's params (unknown names are not looked at here)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    def result_fingerprint(self, model_sha256: str, imgsz: int | str, runtime: str = "torch",
                           precision: str = "fp32") -> str:
        """Hash of everything that changes detections: staged work is reusable only if equal.

        ``runtime`` and ``precision`` are the ones actually used (never "auto"): PyTorch and
        OpenVINO, fp32 and fp16 or bf16, agree only to rounding, and a retry must not mix them
        in one shard.
        """
        key = {"model": model_sha256, "imgsz": imgsz, "conf": self.conf, "iou": self.iou,
               "max_det": self.max_det, "fast_decode": self.fast_decode}
        # Named only when not the default, which keeps the fingerprints of staged work valid.
        if runtime != "torch":
            key["runtime"] = runtime
        if precision != "fp32":
            key["precision"] = precision
        key.update(self.slicing_key())  # a retry never mixes whole-image and sliced results
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
