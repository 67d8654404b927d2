"""Image-size rules, in one place: how a size is written, the bounds of its sides, the model's
input size (each side rounded up to the model's stride, as Ultralytics does), the reference
frame that bounds per-image work, and how many slices a grid makes.

Standard library only: the settings (and so the DAG file) use it as well as the engine.
"""

from __future__ import annotations

import logging
import math
import re

log = logging.getLogger(__name__)

# The sides a size setting (imgsz, slice_size) may have, given as N or as HEIGHTxWIDTH alike:
# 12000 x 2048 line scans at native resolution fit, with room.
MIN_SIDE, MAX_SIDE = 32, 16384

# The frame the per-image work is sized on (a 2048 x 12000 line scan, as (height, width)): the
# slice cap (settings.MAX_SLICES_PER_IMAGE) and infer's time limit in sliced mode.
REFERENCE_FRAME_HW = (12000, 2048)


def size_hw(value: int | str | None) -> tuple[int, int] | None:
    """A checked size as (height, width); None for no size (None or 0)."""
    if not value:
        return None
    if isinstance(value, int):
        return value, value
    h, w = (int(v) for v in re.split(r"\s*[xX]\s*", value.strip()))
    return h, w


def size_text(hw: tuple[int, int]) -> int | str:
    """As the settings write a size: the number for a square, else ``"HxW"``."""
    return hw[0] if hw[0] == hw[1] else f"{hw[0]}x{hw[1]}"


def stride_multiple(hw: tuple[int, int], stride: int) -> tuple[int, int]:
    """Each side rounded up to a multiple of ``stride`` (at least one stride)."""
    h, w = (max(math.ceil(x / stride) * stride, stride) for x in hw)
    return h, w


def model_input_size(imgsz: int | str, stride: int) -> tuple[int, int]:
    """The letterbox target (h, w): a square for a number; each side of ``"HxW"`` rounded up to
    a multiple of the model's stride, as Ultralytics' check_imgsz does (with a warning)."""
    hw = size_hw(imgsz)
    assert hw is not None
    rounded = stride_multiple(hw, stride)
    if rounded != hw:
        log.warning("imgsz %s is not a multiple of the model's stride %d: using %dx%d", imgsz,
                    stride, *rounded)
    return rounded


def slice_count(height: int, width: int, slice_hw: tuple[int, int], overlap: float) -> int:
    """How many windows ``slicing.slice_grid`` makes, counted without making them: rows x
    columns, each axis stepping by the slice minus its overlap until it reaches the edge."""

    def along(length: int, size: int) -> int:
        step_back, end, count = int(overlap * size), 0, 0
        start = 0
        while end < length:
            end = start + size
            count += 1
            start = end - step_back
        return count

    return along(height, slice_hw[0]) * along(width, slice_hw[1])
