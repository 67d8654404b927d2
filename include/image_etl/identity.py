"""A result's identity: the model's weights plus the settings that change its detections.

"Already loaded" means loaded with this model *and* these result settings: a re-run with
another ``conf`` or ``slice_size`` processes the night again instead of skipping it. The key
is a short hash of the settings *as asked for* (``runtime`` / ``precision`` ``auto`` stay
``auto``): discover decides what to skip before any device has resolved them, and an
operator compares what they asked for. The staging fingerprint (``result_fingerprint``)
is the finer, resolved one that a worker's resume checks.

Stable across versions: a field joins the key only when it differs from its default, so a
setting added later does not make every night look unloaded (the same rule the staging
fingerprint follows).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from image_etl.settings import SETTINGS, InferSettings

# What changes the detections of an image, besides the weights (sha256, a column of its own).
RESULT_FIELDS = ("imgsz", "conf", "iou", "max_det", "fast_decode", "runtime", "precision")
# Only when sliced: in whole-image mode they do not change anything.
SLICING_FIELDS = ("slice_size", "slice_overlap", "full_image_pass", "merge", "merge_metric",
                  "merge_threshold", "merge_class_agnostic")
# Part of every key, default or not: they were there from the first key on.
ALWAYS = ("imgsz", "conf", "iou")


def result_settings(infer: InferSettings) -> dict[str, Any]:
    """The settings that produced a result, as recorded beside its rows."""
    fields = RESULT_FIELDS + (SLICING_FIELDS if infer.sliced else ())
    values = {name: getattr(infer, name) for name in fields}
    return {name: value for name, value in values.items()
            if name in ALWAYS or value != SETTINGS[name].default}


def result_key(settings: dict[str, Any]) -> str:
    """16 hex digits naming ``result_settings(...)``: equal settings, equal key."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe(settings: dict[str, Any]) -> str:
    """``conf=0.25 iou=0.7 imgsz=model`` for logs and the report."""
    return " ".join(f"{k}={'model' if v is None else v}" for k, v in sorted(settings.items()))
