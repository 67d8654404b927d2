"""Annotated images: boxes and labels drawn on a decoded image, encoded as JPEG."""

from __future__ import annotations

import cv2
import numpy as np


def draw_annotations(image: np.ndarray, dets: np.ndarray, names: dict[int, str],
                     scale: tuple[float, float] = (1.0, 1.0), inplace: bool = False) -> np.ndarray:
    """Boxes and labels drawn on ``image`` (whose pixels are ``scale`` x full size); on a copy
    unless ``inplace``."""
    if image.ndim == 2 or image.shape[2] == 1:
        out = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    else:
        out = image if inplace else image.copy()
    thickness = max(2, round(max(out.shape[:2]) / 1500))
    palette = ((56, 56, 255), (255, 157, 151), (31, 112, 255), (29, 178, 255), (49, 210, 207))
    for row in dets.tolist():
        cls, conf = int(row[0]), row[1]
        x1, y1, x2, y2 = (round(row[2] * scale[0]), round(row[3] * scale[1]),
                          round(row[4] * scale[0]), round(row[5] * scale[1]))
        color = palette[cls % len(palette)]
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness)
        label = f"{names.get(cls, cls)} {conf:.2f}"
        font_scale = thickness / 3
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        top = max(y1 - th - 4, 0)
        cv2.rectangle(out, (x1, top), (x1 + tw + 4, top + th + 4), color, -1)
        cv2.putText(out, label, (x1 + 2, top + th + 2), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (255, 255, 255), thickness, cv2.LINE_AA)
    return out


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding of an annotated image failed")
    return buf.tobytes()
