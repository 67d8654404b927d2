"""The forward step: a batch of letterboxed model inputs → each input's detections.

The model's backend (``image_etl.backends``, whatever the runtime) takes the stacked uint8
batch to raw predictions; then Ultralytics' predictor steps (NMS on the device; boxes scaled
to the pixels that were letterboxed), each input's boxes to the full-size image, and a single
device → host copy for the whole batch. An input is a whole decoded image,
or one slice of it (``ModelInput.offset``: where it starts in the image).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from image_etl.decode import DecodedImage
from image_etl.model import LoadedModel


@dataclasses.dataclass
class ModelInput:
    """One letterboxed input of the model and where its boxes belong in the full image.

    ``source_shape`` is the (h, w) of the pixels that were letterboxed; ``scale`` maps those
    pixels to full-size ones (fast mode decodes smaller); ``offset`` is where they start in
    the full-size image.
    """

    image: DecodedImage
    input: np.ndarray
    source_shape: tuple[int, int]
    scale: tuple[float, float] = (1.0, 1.0)  # (x, y) factors to full-size pixels
    offset: tuple[int, int] = (0, 0)  # (x, y) in full-size pixels (a slice's origin)
    position: int = 0  # among the image's inputs: the order their detections are merged in


def detect_batch(model: LoadedModel, batch: Sequence[DecodedImage | ModelInput], conf: float,
                 iou: float, max_det: int = 300) -> list[np.ndarray]:
    """Letterboxed inputs → per-input detections (rows as ``staging.DET_FIELDS``).

    The backend's forward pass, then Ultralytics' predictor steps (NMS on the device;
    scale_boxes to the letterboxed pixels' own size), each input's boxes to the full-size
    image, and a single device → host copy for the whole batch.
    """
    import torch
    from ultralytics.utils import nms

    inputs = [as_model_input(b) for b in batch]
    stacked = np.stack([b.input for b in inputs])
    shape = stacked.shape[1:3]  # letterboxed (h, w) of the batch
    with torch.inference_mode():
        preds = model.backend.infer(stacked)  # uint8 BGR NHWC in (image_etl.backends)
        dets = nms.non_max_suppression(preds, conf, iou, None, False, max_det=max_det, nc=0,
                                       end2end=model.end2end)
        rows = [_to_full_image(j, d, shape, unit) for j, (d, unit) in enumerate(zip(dets, inputs))]
        table = torch.cat(rows).cpu().numpy()  # the batch's one device → host copy
    return [_shifted(table[table[:, 0] == j, 1:], unit) for j, unit in enumerate(inputs)]


def _shifted(rows: np.ndarray, unit: ModelInput) -> np.ndarray:
    """A slice's boxes moved to its place in the image, in float64 on the host (as SAHI
    shifts them: exactly, whatever the image's size); other inputs' rows as they are."""
    if unit.offset == (0, 0):
        return rows
    rows = rows.astype(np.float64)  # cls, conf, x1, y1, x2, y2, then the normalised box
    rows[:, [2, 4]] += unit.offset[0]
    rows[:, [3, 5]] += unit.offset[1]
    return rows


def as_model_input(item: DecodedImage | ModelInput) -> ModelInput:
    """A whole decoded image as its one model input."""
    if isinstance(item, ModelInput):
        return item
    assert item.input is not None
    h, w = item.orig_shape
    dh, dw = item.decoded_shape
    return ModelInput(item, item.input, item.decoded_shape, (w / dw, h / dh))


def _to_full_image(j: int, d: Any, shape: tuple[int, int], unit: ModelInput) -> Any:
    """One input's NMS output → rows [j, cls, conf, x1, y1, x2, y2, xc, yc, w, h] (normalised
    centre box), in full-size pixels but for a slice's offset (``_shifted``), on the device."""
    import torch
    from ultralytics.utils import ops

    d = d[:, :6].float()
    ops.scale_boxes(shape, d[:, :4], unit.source_shape)  # also clips to the source pixels
    h, w = unit.image.orig_shape
    sx, sy = unit.scale
    if (sx, sy) != (1.0, 1.0):  # fast mode: the decoded image was smaller
        d[:, [0, 2]] = (d[:, [0, 2]] * sx).clamp(0, w)
        d[:, [1, 3]] = (d[:, [1, 3]] * sy).clamp(0, h)
    xywhn = ops.xyxy2xywh(d[:, :4])
    xywhn[:, [0, 2]] /= w
    xywhn[:, [1, 3]] /= h
    index = torch.full((len(d), 1), j, dtype=d.dtype, device=d.device)
    return torch.cat([index, d[:, 5:6], d[:, 4:5], d[:, :4], xywhn], 1)
