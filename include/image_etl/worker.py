"""run_shard(): one device's streaming pipeline, in small steps joined by bounded hand-offs.

    tasks ─► decode + the image's model inputs (ordered_map: K threads, a bounded window,
             manifest order; plans.py: the whole image, or SAHI's slices and the whole image)
          ─► fixed batches (plans.FixedBatcher: groups of consecutive images, one input shape)
          ─► forward step (main thread, forward.py): stack → device → forward → NMS → scale →
             one .cpu() per batch
          ─► per image: its inputs' detections put together, merged when sliced
             (plans.ImageCollector)
          ─► Writers (bounded, one or several threads): txt (tmp + rename), staging line,
             optional annotated image

Every hand-off blocks when full (nothing is dropped, memory stays flat). The stop protocol is
``pipeline.py``'s: any stage's exception is raised in the main thread, which leaves the ``with``
blocks, and they cancel what has not started and join every thread. A bad image is not an
exception: it is written as ``failed`` with its reason and the rest go on.

Batches are made within fixed groups of ``batch_size`` consecutive images of the shard (a bad
image leaves its place in its group empty), and a resumed attempt re-runs each group it has
work in whole, inferring but not rewriting the images an earlier attempt finished. So every
image meets the model in the same batch, with the same torch thread count, whatever attempt
writes it: a re-run or a retry after a crash writes byte-identical files and rows. (On a CPU
both the batch size and the thread count change the last bits of the results, and sometimes
the txt text.)
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from image_etl.annotate import draw_annotations, encode_jpeg
from image_etl.atomic_files import atomic_write, remove_stale_temps
from image_etl.decode import DecodedImage, Decoder
from image_etl.forward import ModelInput, detect_batch
from image_etl.model import LoadedModel
from image_etl.output_paths import OutputLayout, OutputPathError
from image_etl.pipeline import StageStuckError, Writers, ordered_map
from image_etl.plans import FixedBatcher, ImageCollector, plan_for
from image_etl.resources import cpu_count
from image_etl.settings import InferSettings
from image_etl.shard_report import ProgressLog, ShardReport
from image_etl.sizes import model_input_size, size_text
from image_etl.staging import StagingWriter, image_record
from image_etl.watchdog import Watchdog, stall_limit_s
from image_etl.yolo_txt import format_txt

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ImageTask:
    path: Path  # absolute path to read
    rel_path: str  # identity: path relative to the drop root, used for outputs and rows


# --- the sink: what happens to a finished image --------------------------------------------------

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


# --- the shard's pipeline ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Picked:
    """An image this attempt runs: its task, its fixed batch group, and whether an earlier
    attempt finished it (then it is inferred for its batch mates' sake, not written)."""

    index: int
    task: ImageTask
    group: int
    replay: bool
    closes_group: bool  # the last image of its group: its batches can all go now


def pick(tasks: Sequence[ImageTask], batch_size: int, done: Collection[str]) -> list[_Picked]:
    """The groups with unfinished work, whole (see the module docstring)."""
    todo_groups = {i // batch_size for i, t in enumerate(tasks) if t.rel_path not in done}
    picked = [i for i in range(len(tasks)) if i // batch_size in todo_groups]
    return [_Picked(k, tasks[i], i // batch_size, tasks[i].rel_path in done,
                    k + 1 == len(picked) or picked[k + 1] // batch_size != i // batch_size)
            for k, i in enumerate(picked)]


class _Shard:
    """One attempt at a shard: decode → inputs → batches → forward → collect → write."""

    def __init__(self, picked: list[_Picked], model: LoadedModel, settings: InferSettings,
                 sink: ResultSink, report: ShardReport, imgsz: tuple[int, int],
                 watchdog: Watchdog) -> None:
        self.picked = picked
        self.watchdog = watchdog
        self.model = model
        self.settings = settings
        self.sink = sink
        self.report = report
        self.plan = plan_for(settings, imgsz, model.stride)
        configured = settings.decode_workers or cpu_count()
        self.configured_threads = configured  # not capped by this attempt's images (_share_cpu)
        self.threads = max(1, min(configured, len(picked)))
        # Annotated images are full-size frames drawn and JPEG-encoded on the writer side:
        # as costly as a decode, so they get as many threads, and shorter queues (each queued
        # item then holds the whole decoded image).
        self.writers = self.threads if settings.save_annotated else 1
        batch = settings.batch_size
        # Decoded items in flight: a model input each; a whole 74 MB image each when annotating
        # or slicing, hence fewer of them.
        self.window = settings.decoded_queue_size or (
            self.threads + 2 if settings.sliced else batch + self.threads
            if settings.save_annotated else max(2 * batch, 2 * self.threads))
        self.write_capacity = (min(settings.write_queue_size, 2 * self.writers)
                               if settings.save_annotated else settings.write_queue_size)
        report.decode_threads, report.writers = self.threads, self.writers
        self.batcher = FixedBatcher(batch)
        self.collector = ImageCollector(self.plan)
        self.decoder = Decoder(imgsz, model.stride, fast=settings.fast_decode,
                               keep_image=settings.save_annotated or settings.sliced,
                               max_pixels=settings.max_image_pixels,
                               make_input=not settings.sliced or settings.full_image_pass)
        self._count_lock = threading.Lock()

    def run(self) -> None:
        self._share_cpu()
        report = self.report
        start = time.perf_counter()
        progress = ProgressLog(sum(not p.replay for p in self.picked), report,
                               self.settings.progress_every_s)
        mark = self.watchdog.mark
        stuck_after = self.watchdog.limit_s  # a join that long without progress is stuck
        try:
            with Writers(self._write, count=self.writers, capacity=self.write_capacity,
                         join_timeout_s=stuck_after) as out, \
                    ordered_map(self._decode, self.picked, threads=self.threads,
                                window=self.window, name="decode", abort=out.check,
                                join_timeout_s=stuck_after) as decoded:
                try:
                    for item, inputs in _marked(decoded, mark, "decode (waiting for the next "
                                                               "decoded image)"):
                        report.decode_s += item.seconds
                        picked = self.picked[item.index]
                        if item.error is not None:
                            self._finished(item, None, out)
                        else:
                            self.collector.expect(item, len(inputs))
                            for batch in self.batcher.add(picked.group, inputs):
                                self._infer(batch, out)
                        if picked.closes_group:  # its images are written before the next decode
                            for batch in self.batcher.flush():
                                self._infer(batch, out)
                        progress.maybe_log(time.perf_counter() - start)
                finally:
                    mark("shutdown (joining the decode threads and the writers)")
        finally:
            report.wall_s = time.perf_counter() - start
            report.batch_size = self.batcher.batch_size
        progress.log_final()

    def _decode(self, p: _Picked) -> tuple[DecodedImage, list[ModelInput]]:
        """On a decode thread: the image and its model inputs (slicing included)."""
        item = self.decoder(p.index, p.task.path, p.task.rel_path)
        start = time.perf_counter()
        inputs = self.plan.inputs(item) if item.error is None else []
        item.seconds += time.perf_counter() - start
        return item, inputs

    def _infer(self, batch: list[ModelInput], out: Writers) -> None:
        for unit, dets in zip(batch, self.infer_batch(batch), strict=True):
            image_dets = self.collector.add(unit, dets)
            if image_dets is not None:
                unit.image.input = None  # free the model input before the image waits
                self._finished(unit.image, image_dets, out)

    def _finished(self, item: DecodedImage, dets: np.ndarray | None, out: Writers) -> None:
        if not self.picked[item.index].replay:  # done by an earlier attempt: only its mates
            self.watchdog.mark("write (waiting for a free writer)")
            out.put((item, dets))

    def infer_batch(self, batch: list[ModelInput]) -> list[np.ndarray]:
        """The forward step, halving the batch on a GPU out-of-memory error until it fits."""
        import torch

        t0 = time.perf_counter()
        self.watchdog.mark(f"forward (a batch of {len(batch)} model input(s) on "
                           f"{self.model.device}, runtime {self.model.runtime})")
        try:
            out = self._forward(batch)
            self.report.infer_s += time.perf_counter() - t0
            return out
        except torch.cuda.OutOfMemoryError:
            if len(batch) == 1:
                raise
        # Out of the handler: the error's traceback held the failed forward's frames, hence
        # its tensors; only now can empty_cache() give their memory back for the retry.
        torch.cuda.empty_cache()
        self.batcher.batch_size = max(1, min(self.batcher.batch_size, len(batch) // 2))
        log.warning("GPU out of memory on a batch of %d: batch size is now %d",
                    len(batch), self.batcher.batch_size)
        self.report.infer_s += time.perf_counter() - t0
        out = []
        while len(out) < len(batch):  # the size may shrink again inside
            out += self.infer_batch(batch[len(out):len(out) + self.batcher.batch_size])
        return out

    def _forward(self, batch: list[ModelInput]) -> list[np.ndarray]:
        st = self.settings
        return detect_batch(self.model, batch, st.conf, st.iou, st.max_det)

    def _write(self, job: tuple[DecodedImage, np.ndarray | None]) -> None:
        item, dets = job
        t0 = time.perf_counter()
        self.sink.write(item, dets)
        with self._count_lock:
            self.report.write_s += time.perf_counter() - t0
            self.report.count(item, dets)

    def _share_cpu(self) -> None:
        """On a CPU device the model competes with the decode threads for the same cores: its
        backend takes its share of them (``image_etl.backends``)."""
        threads = self.model.backend.share_cpu(cpu_count(), self.configured_threads)
        if threads is not None:
            log.debug("CPU inference (%s): %d thread(s) beside %d decode thread(s)",
                      self.model.runtime, threads, self.threads)


def _marked(items: Iterable[T], mark: Callable[[str], None], stage: str) -> Iterator[T]:
    """``items``, marking ``stage`` for the watchdog while each next one is waited for."""
    iterator = iter(items)
    while True:
        mark(stage)
        try:
            item = next(iterator)
        except StopIteration:
            return
        yield item


def _remove_stale_temps(tasks: Sequence[ImageTask], layout: OutputLayout, annotated: bool) -> None:
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


def _default_timeout_per_image_s() -> float:
    import os

    from image_etl.settings import SETTINGS, check

    spec = SETTINGS["timeout_per_image_s"]
    raw = os.environ.get(spec.env) if spec.env else None
    return float(check("timeout_per_image_s", raw if raw else spec.default))


def run_shard(tasks: Sequence[ImageTask], model: LoadedModel, settings: InferSettings,
              layout: OutputLayout, staging_path: Path | None = None,
              sink: ResultSink | None = None, watchdog: Watchdog | None = None,
              timeout_per_image_s: float | None = None) -> ShardReport:
    """Run ``tasks`` through ``model`` and write every result; return what happened.

    With ``staging_path`` the shard is resumable: images an earlier attempt finished (same
    model and result-relevant settings) are skipped. Raises the first pipeline error.

    ``watchdog`` (default: one that ends the process, its limit from ``timeout_per_image_s``,
    default the setting's, from ``IMAGE_ETL_TIMEOUT_PER_IMAGE_S`` where set; see
    ``watchdog.py``) watches the pipeline's stages while it runs, and after it when a thread
    could not be joined.
    """
    imgsz = model_input_size(settings.imgsz or model.default_imgsz, model.stride)
    if watchdog is None:
        per_image = timeout_per_image_s or _default_timeout_per_image_s()
        watchdog = Watchdog(stall_limit_s(per_image, settings.batch_size),
                            what=f"shard on {model.device}")
    if sink is None:
        staging = None
        if staging_path is not None:
            fingerprint = settings.result_fingerprint(model.sha256, size_text(imgsz),
                                                      model.runtime, model.precision)
            staging = StagingWriter(staging_path, fingerprint,
                                    {"model_sha256": model.sha256, "model_path": str(model.path),
                                     "imgsz": size_text(imgsz), "device": str(model.device),
                                     "runtime": model.runtime, "precision": model.precision,
                                     "names": {str(k): v for k, v in model.names.items()}})
        sink = OutputSink(layout, model.names, settings.save_annotated, staging)
    report = ShardReport(device=str(model.device), images=len(tasks),
                         staging_path=str(staging_path) if staging_path else None)
    with watchdog:
        try:
            done = sink.open()
            _remove_stale_temps(tasks, layout, settings.save_annotated)
            todo = [t for t in tasks if t.rel_path not in done]
            report.resumed = len(tasks) - len(todo)
            if report.resumed:
                log.info("resuming: %d of %d images already done by an earlier attempt",
                         report.resumed, len(tasks))
            if todo:
                _Shard(pick(tasks, settings.batch_size, done.keys()), model, settings, sink,
                       report, imgsz, watchdog).run()
        except StageStuckError as exc:
            # The stuck thread would keep the process alive at exit (and its lease held):
            # the watchdog ends it unless it exits by itself first.
            watchdog.linger(f"exit (after the error: {exc})")
            raise
        finally:
            sink.close()
    return report
