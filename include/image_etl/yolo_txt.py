"""The YOLO txt label format, byte-compatible with Ultralytics ``Results.save_txt(save_conf=True)``:
one line per box, ``cls xc yc w h conf`` normalised, ``%g``; an empty file when nothing was
detected."""

from __future__ import annotations

import numpy as np


def format_txt(dets: np.ndarray) -> str:
    """``dets`` rows as staging.DET_FIELDS → the txt body Ultralytics' save_txt would write."""
    lines = []
    for row in dets.tolist():
        line = (int(row[0]), row[6], row[7], row[8], row[9], row[1])
        lines.append(("%g " * len(line)).rstrip() % line)
    return "".join(line + "\n" for line in lines)
