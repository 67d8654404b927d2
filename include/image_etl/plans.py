"""The steps between decode and the writers: which model inputs an image becomes, how they
are batched, and how their detections become the image's again.

    ImagePlan / SlicedPlan: an image → its model inputs (one; or SAHI's slices, plus the
        whole image) and their detections → the image's (as they are; or merged, slicing.py)
    FixedBatcher: inputs → batches of one shape within fixed groups of consecutive images
    ImageCollector: each input's detections, until an image has all of its own
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import numpy as np

from image_etl.decode import DecodedImage
from image_etl.forward import ModelInput, as_model_input
from image_etl.settings import InferSettings


class ImagePlan:
    """Which model inputs an image becomes, and how their detections become the image's.
    Whole-image mode: one input, its detections as they are."""

    def inputs(self, item: DecodedImage) -> list[ModelInput]:
        return [as_model_input(item)]

    def combine(self, item: DecodedImage, parts: list[np.ndarray]) -> np.ndarray:
        return parts[0]


class SlicedPlan(ImagePlan):
    """Sliced inference: each image becomes the slices of SAHI's grid (views of the decoded
    image until a batch is stacked, letterboxed like Ultralytics only when a slice is not
    already the model's input size) plus, if asked, the whole image; their detections are
    merged into the image's (``slicing.Merger``)."""

    def __init__(self, settings: InferSettings, imgsz: tuple[int, int], stride: int) -> None:
        from ultralytics.data.augment import LetterBox

        from image_etl.sizes import size_hw
        from image_etl.slicing import Merger

        slice_hw = size_hw(settings.slice_size)
        assert slice_hw is not None
        self.slice_hw = slice_hw
        self.overlap = settings.slice_overlap
        self.full_image_pass = settings.full_image_pass
        self.keep_image = settings.save_annotated
        self.target = imgsz
        self.letterbox = LetterBox(imgsz, auto=True, stride=stride)
        self.merger = Merger(settings.merge, settings.merge_metric, settings.merge_threshold,
                             settings.merge_class_agnostic)

    def inputs(self, item: DecodedImage) -> list[ModelInput]:
        from image_etl.slicing import slice_grid

        image = item.image
        assert image is not None, "sliced inference needs the decoded image"
        grid = slice_grid(image.shape[0], image.shape[1], self.slice_hw, self.overlap)
        units = []
        for k, (x1, y1, x2, y2) in enumerate(grid.tolist()):
            view = image[y1:y2, x1:x2]
            # A slice of the model's own size letterboxes to itself: keep the view.
            pixels = view if view.shape[:2] == self.target else cast(np.ndarray,
                                                                     self.letterbox(image=view))
            units.append(ModelInput(item, pixels, view.shape[:2], offset=(x1, y1), position=k))
        if self.full_image_pass and len(grid) > 1:  # SAHI: only when there are slices
            units.append(as_model_input(item))
            units[-1].position = len(grid)
        if not self.keep_image:
            item.image = None  # the slices' views keep the pixels until their batch is done
        return units

    def combine(self, item: DecodedImage, parts: list[np.ndarray]) -> np.ndarray:
        h, w = item.orig_shape
        return self.merger(np.concatenate(parts) if parts else np.zeros((0, 10)), w, h)


def plan_for(settings: InferSettings, imgsz: tuple[int, int], stride: int) -> ImagePlan:
    return SlicedPlan(settings, imgsz, stride) if settings.sliced else ImagePlan()


class FixedBatcher:
    """Model inputs → batches of one shape, never across a group of consecutive images.

    Inputs are bucketed by shape within the current group; a bucket goes out when it holds
    ``batch_size`` inputs (read at each add: an out-of-memory error lowers it), the rest when
    the group ends.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._group: int | None = None
        self._buckets: dict[tuple[int, ...], list[ModelInput]] = {}

    def add(self, group: int, inputs: list[ModelInput]) -> Iterator[list[ModelInput]]:
        if group != self._group:
            yield from self.flush()
            self._group = group
        for unit in inputs:
            bucket = self._buckets.setdefault(unit.input.shape, [])
            bucket.append(unit)
            if len(bucket) >= self.batch_size:
                del self._buckets[unit.input.shape]
                yield bucket

    def flush(self) -> Iterator[list[ModelInput]]:
        buckets, self._buckets = self._buckets, {}
        yield from buckets.values()


class ImageCollector:
    """Gathers each image's inputs' detections; hands the image on when its last one is in."""

    def __init__(self, plan: ImagePlan) -> None:
        self.plan = plan
        self._parts: dict[int, dict[int, np.ndarray]] = {}
        self._expected: dict[int, int] = {}

    def expect(self, item: DecodedImage, count: int) -> None:
        self._expected[item.index] = count
        self._parts[item.index] = {}

    def add(self, unit: ModelInput, dets: np.ndarray) -> np.ndarray | None:
        """The image's detections once all its inputs are in, else None."""
        index = unit.image.index
        parts = self._parts[index]
        parts[unit.position] = dets
        if len(parts) < self._expected[index]:
            return None
        del self._parts[index], self._expected[index]
        return self.plan.combine(unit.image, [parts[k] for k in sorted(parts)])
