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

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from image_etl.decode import DecodedImage, Decoder
from image_etl.forward import ModelInput, detect_batch
from image_etl.model import LoadedModel
from image_etl.output_paths import OutputLayout
from image_etl.pipeline import StageStuckError, Writers, ordered_map
from image_etl.plans import FixedBatcher, ImageCollector, plan_for
from image_etl.resources import cpu_count
from image_etl.settings import InferSettings
from image_etl.shard_report import ProgressLog, ShardReport
from image_etl.sink import (
    OutputSink,
    ResultSink,
    StagingObject,
    output_sink,
    remove_stale_output_temps,
)
from image_etl.sizes import model_input_size, size_text
from image_etl.storage import (
    BucketNotFoundError,
    LocalStorage,
    Storage,
    StorageAccessError,
    StorageError,
    StorageNotFoundError,
    read_ahead,
)
from image_etl.watchdog import Watchdog, stall_limit_s

log = logging.getLogger(__name__)
T = TypeVar("T")

JOIN_SHARE_OF_STALL_LIMIT = 0.75  # a stage's join at shutdown waits this share of the stall limit

# Object reads ahead of the decoders: enough concurrent GETs that decoding, not the network, is
# the bound. A GET of a few MB takes ~50-100 ms on a cloud object store, an exact decode ~90 ms
# of a core: two reads in flight per decode thread keep the decoders fed with room to spare
# (8 at least, the most a 2-core host needs: bench/README.md). At most twice that many files
# are held (a 2048 x 12000 JPEG is a few MB): memory stays flat whatever the drop's size.
MIN_READ_THREADS = 8
READS_PER_DECODE_THREAD = 2


def read_concurrency(decode_threads: int) -> tuple[int, int]:
    """(concurrent reads, files held at most) of the read-ahead for ``decode_threads``."""
    threads = max(MIN_READ_THREADS, READS_PER_DECODE_THREAD * decode_threads)
    return threads, 2 * threads


__all__ = ["ImageTask", "OutputSink", "ResultSink", "ShardReport", "run_shard"]


@dataclasses.dataclass(frozen=True)
class ImageTask:
    path: Path | None  # absolute path to read; None: read rel_path from the shard's source
    rel_path: str  # identity: path relative to the drop root, used for outputs and rows




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
                 watchdog: Watchdog, source: Storage | None = None) -> None:
        self.picked = picked
        self.watchdog = watchdog
        self.source = source
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
        self.writers = max(self.threads if settings.save_annotated else 1, sink.min_writers)
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
        # A join that long without progress is stuck. It gives up before the watchdog would
        # (both count from the shutdown mark), so the error names the stuck stage.
        stuck_after = JOIN_SHARE_OF_STALL_LIMIT * self.watchdog.limit_s
        try:
            with Writers(self._write, count=self.writers, capacity=self.write_capacity,
                         join_timeout_s=stuck_after) as out, \
                    contextlib.closing(self._jobs()) as jobs, \
                    ordered_map(self._decode, jobs, threads=self.threads,
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

    def _jobs(self) -> Generator[tuple[_Picked, bytes | Exception | None], None, None]:
        """The images to decode: local files are read by the decode threads themselves; objects
        are fetched ahead, concurrently (a GET waits on the network, not on a core), a bounded
        number of them in memory beyond the decode window (read_concurrency)."""
        if self.source is None:
            yield from ((p, None) for p in self.picked)
            return
        rel_paths = [p.task.rel_path for p in self.picked]
        threads, window = read_concurrency(self.threads)
        with contextlib.closing(read_ahead(self.source.read_bytes, rel_paths,
                                           threads=threads, window=window)) as reads:
            for p, (_, data) in zip(self.picked, reads, strict=True):
                yield p, data

    def _decode(self, job: tuple[_Picked, bytes | Exception | None]
                ) -> tuple[DecodedImage, list[ModelInput]]:
        """On a decode thread: the image and its model inputs (slicing included)."""
        p, data = job
        if isinstance(data, BucketNotFoundError) or (
                isinstance(data, StorageError)
                and not isinstance(data, StorageNotFoundError | StorageAccessError)):
            raise data  # the storage, not this image (unreachable, no bucket): stop the shard
        item = self.decoder(p.index, p.task.path, p.task.rel_path, data)
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




def _default_timeout_per_image_s() -> float:
    import os

    from image_etl.settings import SETTINGS, check

    spec = SETTINGS["timeout_per_image_s"]
    raw = os.environ.get(spec.env) if spec.env else None
    return float(check("timeout_per_image_s", raw if raw else spec.default))


def run_shard(tasks: Sequence[ImageTask], model: LoadedModel, settings: InferSettings,
              layout: OutputLayout | Storage, staging_path: Path | StagingObject | None = None,
              sink: ResultSink | None = None, watchdog: Watchdog | None = None,
              timeout_per_image_s: float | None = None, *,
              source: Storage | None = None) -> ShardReport:
    """Run ``tasks`` through ``model`` and write every result; return what happened.

    ``layout``: a local output folder, or an object-storage output (``open_storage``).
    ``source``: the drop on object storage; the tasks' images are read from it (their
    ``path`` is not used). With ``staging_path`` (a file, or an object) the shard is
    resumable: images an earlier attempt finished (same model and result-relevant settings)
    are skipped. Raises the first pipeline error.

    ``watchdog`` (default: one that ends the process, its limit from ``timeout_per_image_s``,
    default the setting's, from ``IMAGE_ETL_TIMEOUT_PER_IMAGE_S`` where set; see
    ``watchdog.py``) watches the pipeline's stages while it runs, and after it when a thread
    could not be joined.
    """
    if isinstance(layout, LocalStorage):
        layout = OutputLayout(layout.root)
    if isinstance(source, LocalStorage):
        source = None  # the decode threads read local files themselves, as always
    imgsz = model_input_size(settings.imgsz or model.default_imgsz, model.stride)
    if watchdog is None:
        per_image = timeout_per_image_s or _default_timeout_per_image_s()
        watchdog = Watchdog(stall_limit_s(per_image, settings.batch_size),
                            what=f"shard on {model.device}")
    if sink is None:
        fingerprint = settings.result_fingerprint(model.sha256, size_text(imgsz),
                                                  model.runtime, model.precision)
        meta = {"model_sha256": model.sha256, "model_path": str(model.path),
                "imgsz": size_text(imgsz), "device": str(model.device),
                "runtime": model.runtime, "precision": model.precision,
                "names": {str(k): v for k, v in model.names.items()}}
        sink = output_sink(layout, model.names, settings.save_annotated, staging_path,
                           fingerprint, meta)
    shown = staging_path.display() if isinstance(staging_path, StagingObject) else staging_path
    report = ShardReport(device=str(model.device), images=len(tasks),
                         staging_path=str(shown) if shown else None)
    with watchdog:
        try:
            done = sink.open()
            if isinstance(layout, OutputLayout):
                remove_stale_output_temps(tasks, layout, settings.save_annotated)
            todo = [t for t in tasks if t.rel_path not in done]
            report.resumed = len(tasks) - len(todo)
            if report.resumed:
                log.info("resuming: %d of %d images already done by an earlier attempt",
                         report.resumed, len(tasks))
            if todo:
                _Shard(pick(tasks, settings.batch_size, done.keys()), model, settings, sink,
                       report, imgsz, watchdog, source).run()
        except StageStuckError as exc:
            # The stuck thread would keep the process alive at exit (and its lease held):
            # the watchdog ends it unless it exits by itself first.
            watchdog.linger(f"exit (after the error: {exc})")
            raise
        finally:
            sink.close()
    return report
