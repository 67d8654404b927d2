"""What happens to a finished image: the worker's output sinks.

``OutputSink`` writes a local output folder: the txt file (temp + rename), the optional
annotated image and the shard's staging line, in that order, so a staged image always has its
txt in place (resume trusts the staging file).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from image_etl.annotate import draw_annotations, encode_jpeg
from image_etl.atomic_files import atomic_write, remove_stale_temps
from image_etl.decode import DecodedImage
from image_etl.output_paths import OutputLayout, OutputPathError
from image_etl.staging import StagingWriter, image_record
from image_etl.yolo_txt import format_txt

log = logging.getLogger(__name__)


class ResultSink:
    """Receives each finished image on a writer thread. Subclass to add outputs.

    With annotated images on there are several writer threads: ``write`` must be thread-safe.
    """

    def open(self) -> dict[str, dict[str, Any]]:
        """Prepare; return the records of images already done (skipped by this attempt)."""
        return {}

    def write(self, item: DecodedImage, dets: np.ndarray | None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class OutputSink(ResultSink):
    """txt files, annotated images and the shard's staging file (safe for several writers)."""

    def __init__(self, layout: OutputLayout, names: dict[int, str], save_annotated: bool = False,
                 staging: StagingWriter | None = None) -> None:
        self.layout = layout
        self.names = names
        self.save_annotated = save_annotated
        self.staging = staging
        self._staging_lock = threading.Lock()

    def open(self) -> dict[str, dict[str, Any]]:
        if self.staging is None:
            return {}
        done = self.staging.resume()
        # Done means staged AND its txt on disk (the txt is renamed into place first).
        return {rel: rec for rel, rec in done.items() if rec["status"] == "ok"}

    def write(self, item: DecodedImage, dets: np.ndarray | None) -> None:
        txt = self.layout.txt_path(item.rel_path, item.path)
        h, w = item.orig_shape
        if item.error is None:
            assert dets is not None
            atomic_write(txt, format_txt(dets))
            if self.save_annotated and item.image is not None:
                scale = (item.decoded_shape[1] / w, item.decoded_shape[0] / h)
                # The decoded image is ours alone now: draw on it instead of on a 74 MB copy.
                annotated = draw_annotations(item.image, dets, self.names, scale, inplace=True)
                item.image = None
                atomic_write(self.layout.annotated_path(item.rel_path), encode_jpeg(annotated))
        else:
            # A failed image has no txt: an empty one would claim "nothing detected".
            txt.unlink(missing_ok=True)
        if self.staging is not None:
            record = image_record(item.rel_path, status="ok" if item.error is None else "failed",
                                  bytes_=item.bytes, width=w, height=h, error=item.error, dets=dets)
            with self._staging_lock:
                self.staging.append(record)

    def close(self) -> None:
        if self.staging is not None:
            self.staging.close()



def remove_stale_output_temps(tasks: Sequence[Any], layout: OutputLayout, annotated: bool) -> None:
    """Temp files an earlier, killed attempt left beside this shard's outputs: its images' txt
    (and annotated) files are this shard's to write, so no other shard is looked at."""
    folders: dict[Path, set[str]] = {}
    for t in tasks:
        try:
            paths = [layout.txt_path(t.rel_path, t.path)]
            if annotated:
                paths.append(layout.annotated_path(t.rel_path))
        except OutputPathError:
            continue  # refused with its reason when the image is written
        for path in paths:
            folders.setdefault(path.parent, set()).add(path.name)
    removed = sum(remove_stale_temps(folder, names) for folder, names in folders.items())
    if removed:
        log.info("removed %d temp file(s) a killed earlier attempt left beside the outputs",
                 removed)
