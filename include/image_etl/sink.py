"""What happens to a finished image: the worker's output sinks.

``OutputSink`` writes a local output folder: the txt file (temp + rename), the optional
annotated image and the shard's staging line, in that order, so a staged image always has its
txt in place (resume trusts the staging file). ``ObjectOutputSink`` writes the same files as
objects under an ``s3://`` output prefix, and its staging file is PUT there periodically
(``ObjectStagingWriter``), so a retry on any host resumes from what a killed attempt wrote.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from image_etl.annotate import draw_annotations, encode_jpeg
from image_etl.atomic_files import atomic_write, remove_stale_temps
from image_etl.decode import DecodedImage
from image_etl.output_paths import OutputLayout, OutputPathError
from image_etl.staging import StagingWriter, image_record
from image_etl.storage import (
    BucketNotFoundError,
    Storage,
    StorageNotFoundError,
    check_rel_path,
)
from image_etl.yolo_txt import format_txt

log = logging.getLogger(__name__)


class ResultSink:
    min_writers = 1  # writer threads it wants at least (more when annotating)
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
                 staging: Staging | None = None) -> None:
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
        h, w = item.orig_shape
        if item.error is None:
            assert dets is not None
            self.put_txt(item, format_txt(dets))
            if self.save_annotated and item.image is not None:
                scale = (item.decoded_shape[1] / w, item.decoded_shape[0] / h)
                # The decoded image is ours alone now: draw on it instead of on a 74 MB copy.
                annotated = draw_annotations(item.image, dets, self.names, scale, inplace=True)
                item.image = None
                self.put_annotated(item, encode_jpeg(annotated))
        else:
            # A failed image has no txt: an empty one would claim "nothing detected".
            self.remove_txt(item)
        if self.staging is not None:
            record = image_record(item.rel_path, status="ok" if item.error is None else "failed",
                                  bytes_=item.bytes, width=w, height=h, error=item.error, dets=dets)
            with self._staging_lock:
                self.staging.append(record)

    def close(self) -> None:
        if self.staging is not None:
            self.staging.close()

    # Where the files go (ObjectOutputSink puts them in a bucket instead).
    def put_txt(self, item: DecodedImage, text: str) -> None:
        atomic_write(self.layout.txt_path(item.rel_path, item.path), text)

    def put_annotated(self, item: DecodedImage, jpeg: bytes) -> None:
        atomic_write(self.layout.annotated_path(item.rel_path), jpeg)

    def remove_txt(self, item: DecodedImage) -> None:
        self.layout.txt_path(item.rel_path, item.path).unlink(missing_ok=True)


class ObjectOutputSink(OutputSink):
    """The same outputs under an object-storage prefix (``labels/<rel>.txt``,
    ``annotated/<rel>.jpg``): one PUT each, which readers see whole or not at all."""

    # A PUT waits on the network, not on a core: a few writers keep it off the critical path.
    min_writers = 4

    def __init__(self, storage: Storage, names: dict[int, str], save_annotated: bool = False,
                 staging: Staging | None = None) -> None:
        super().__init__(OutputLayout(Path("/")), names, save_annotated, staging)
        self.storage = storage

    def put_txt(self, item: DecodedImage, text: str) -> None:
        self.storage.write_atomic(output_key("labels", item.rel_path, ".txt"), text)

    def put_annotated(self, item: DecodedImage, jpeg: bytes) -> None:
        self.storage.write_atomic(output_key("annotated", item.rel_path, ".jpg"), jpeg)

    def remove_txt(self, item: DecodedImage) -> None:
        self.storage.remove_file(output_key("labels", item.rel_path, ".txt"))


def output_key(folder: str, rel_path: str, suffix: str) -> str:
    """``labels/a/b.txt`` for ``a/b.jpg``: the output's path under the output root."""
    rel = PurePosixPath(check_rel_path(rel_path))
    return f"{folder}/{rel.with_suffix(suffix)}"


# --- the staging file on object storage -------------------------------------------------------

# A killed attempt loses at most this much work (inferred again by the retry); each flush PUTs
# the whole file (~2 KB an image with 10 boxes), so flushing far more often costs bandwidth.
FLUSH_S = float(os.environ.get("IMAGE_ETL_STAGING_FLUSH_S", "30"))
FLUSH_IMAGES = int(os.environ.get("IMAGE_ETL_STAGING_FLUSH_IMAGES", "500"))


@dataclasses.dataclass(frozen=True)
class StagingObject:
    """A shard's staging file as an object: ``rel_path`` under ``storage`` (the run folder)."""

    storage: Storage
    rel_path: str

    def display(self) -> str:
        return self.storage.display(self.rel_path)


class ObjectStagingWriter:
    """The shard's staging file on object storage. Objects cannot be appended to, so lines go
    to a local copy (a StagingWriter in a scratch folder) and the whole file is PUT (atomic)
    every ``flush_s`` seconds or ``flush_images`` images, and at close. A killed attempt's work
    survives up to its last PUT; the retry, on any host, starts from that object."""

    def __init__(self, target: StagingObject, fingerprint: str, meta: dict[str, Any], *,
                 flush_s: float = FLUSH_S, flush_images: int = FLUSH_IMAGES) -> None:
        self.target = target
        self.flush_s, self.flush_images = flush_s, max(1, flush_images)
        self._scratch = Path(tempfile.mkdtemp(prefix="image_etl_staging_",
                                              dir=os.environ.get("IMAGE_ETL_SCRATCH_DIR")))
        self.local = StagingWriter(self._scratch / PurePosixPath(target.rel_path).name,
                                   fingerprint, meta)
        self._unflushed = 0
        self._flushed_at = time.monotonic()
        self._opened = False

    def resume(self) -> dict[str, dict[str, Any]]:
        try:
            self.local.path.write_bytes(self.target.storage.read_bytes(self.target.rel_path))
        except BucketNotFoundError:
            raise
        except StorageNotFoundError:
            pass  # a first attempt
        done = self.local.resume()
        self._opened = True
        self.flush()
        return done

    def append(self, record: dict[str, Any]) -> None:
        self.local.append(record)
        self._unflushed += 1
        if (self._unflushed >= self.flush_images
                or time.monotonic() - self._flushed_at >= self.flush_s):
            self.flush()

    def flush(self) -> None:
        self.target.storage.write_atomic(self.target.rel_path, self.local.path.read_bytes())
        self._unflushed = 0
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        try:
            self.local.close()
            if self._opened and self._unflushed:
                self.flush()
        finally:
            self._opened = False
            shutil.rmtree(self._scratch, ignore_errors=True)


Staging = StagingWriter | ObjectStagingWriter



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


def output_sink(output: OutputLayout | Storage, names: dict[int, str], save_annotated: bool,
                staging: Path | StagingObject | None, fingerprint: str,
                meta: dict[str, Any]) -> OutputSink:
    """The sink for a local output folder or an object-storage prefix, with its staging file
    (a local file or an object; None: not resumable)."""
    writer: Staging | None = None
    if staging is not None:
        writer = (StagingWriter(staging, fingerprint, meta) if isinstance(staging, Path)
                  else ObjectStagingWriter(staging, fingerprint, meta))
    if isinstance(output, OutputLayout):
        return OutputSink(output, names, save_annotated, writer)
    return ObjectOutputSink(output, names, save_annotated, writer)
