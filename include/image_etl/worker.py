"""run_shard(): one device's streaming pipeline (the original ``inference_on_gpu``, done right).

    files ─► K decode threads ─► reorder buffer (bounded) ─► main thread: batch → device →
             read, decode,         keeps manifest order      forward → NMS on device → scale
             letterbox                                        → ONE .cpu() per batch
                                                     ─► bounded queue ─► writer thread:
                                                         txt (tmp + rename), staged row,
                                                         optional annotated image

Every hand-off blocks when full (nothing is dropped, memory stays flat) and waits in short
slices so that a failure anywhere stops the other stages promptly; threads are joined and the
first error is raised to the caller. A bad image is not an error: it is written as ``failed``
with its reason and the rest go on.

Batches are fixed groups of ``batch_size`` consecutive images of the shard (a bad image leaves
its place in its group empty), and a resumed attempt re-runs each group it has work in whole,
inferring but not rewriting the images an earlier attempt finished. So every image meets the
model in the same batch, with the same torch thread count, whatever attempt writes it: a re-run
or a retry after a crash writes byte-identical files and rows. (On a CPU both the batch size
and the thread count change the last bits of the results, and sometimes the txt text.)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from image_etl.decode import DecodedImage, Decoder
from image_etl.model import LoadedModel
from image_etl.outputs import (
    OutputLayout,
    OutputPathError,
    StagingWriter,
    atomic_write,
    draw_annotations,
    encode_jpeg,
    format_txt,
    image_record,
    remove_stale_temps,
)
from image_etl.settings import InferSettings

log = logging.getLogger(__name__)
_SLICE_S = 0.1  # how often a blocked stage looks whether another one failed
_END = object()


@dataclasses.dataclass(frozen=True)
class ImageTask:
    path: Path  # absolute path to read
    rel_path: str  # identity: path relative to the drop root, used for outputs and rows


@dataclasses.dataclass
class ShardReport:
    device: str
    images: int = 0  # in the shard
    resumed: int = 0  # already done by an earlier attempt, skipped
    processed: int = 0  # written by this attempt
    ok: int = 0
    failed: int = 0
    detections: int = 0
    wall_s: float = 0.0
    decode_s: float = 0.0  # summed over decode threads
    infer_s: float = 0.0
    write_s: float = 0.0
    decode_threads: int = 0
    writers: int = 0
    batch_size: int = 0  # final (halved after a GPU out-of-memory)
    failures: list[dict[str, str]] = dataclasses.field(default_factory=list)
    staging_path: str | None = None

    @property
    def images_per_s(self) -> float:
        return self.processed / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        wall = self.wall_s or float("nan")
        return {**dataclasses.asdict(self), "images_per_s": round(self.images_per_s, 3),
                "busy": {"decode": round(self.decode_s / wall / max(self.decode_threads, 1), 3),
                         "infer": round(self.infer_s / wall, 3),
                         "write": round(self.write_s / wall / max(self.writers, 1), 3)}}


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


def detect_batch(model: LoadedModel, batch: Sequence[DecodedImage], conf: float, iou: float,
                 max_det: int = 300) -> list[np.ndarray]:
    """Letterboxed inputs → per-image detections (rows as ``outputs.DET_FIELDS``).

    Ultralytics' predictor steps (uint8 to the device, reorder, BGR→RGB, scale; NMS on the
    device; scale_boxes to the decoded image), then fast-mode boxes back to full size, and a
    single device → host copy for the whole batch.
    """
    import torch
    from ultralytics.utils import nms, ops

    stacked = np.stack([b.input for b in batch])
    shape = stacked.shape[1:3]  # letterboxed (h, w) of the batch
    with torch.inference_mode():
        if model.runtime == "openvino":  # layout, BGR → RGB and scaling run inside the graph
            preds = model.backend.infer_bgr(stacked)
        else:
            arr = torch.from_numpy(stacked)
            if model.is_cuda:
                arr = arr.pin_memory()
            im = arr.to(model.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
            im = im.flip(1)  # BGR → RGB
            im = (im.half() if model.fp16 else im.float()).div_(255)
            preds = model.backend(im)
        dets = nms.non_max_suppression(preds, conf, iou, None, False, max_det=max_det, nc=0,
                                       end2end=model.end2end)
        rows = []
        for j, (d, item) in enumerate(zip(dets, batch, strict=True)):
            d = d[:, :6].float()
            ops.scale_boxes(shape, d[:, :4], item.decoded_shape)
            h, w = item.orig_shape
            if item.decoded_shape != item.orig_shape:  # fast mode: back to full size
                dh, dw = item.decoded_shape
                d[:, [0, 2]] *= w / dw
                d[:, [1, 3]] *= h / dh
                d[:, [0, 2]] = d[:, [0, 2]].clamp(0, w)
                d[:, [1, 3]] = d[:, [1, 3]].clamp(0, h)
            xywhn = ops.xyxy2xywh(d[:, :4])
            xywhn[:, [0, 2]] /= w
            xywhn[:, [1, 3]] /= h
            index = torch.full((len(d), 1), j, dtype=d.dtype, device=d.device)
            rows.append(torch.cat([index, d[:, 5:6], d[:, 4:5], d[:, :4], xywhn], 1))
        table = torch.cat(rows).cpu().numpy()  # the batch's one device → host copy
    return [table[table[:, 0] == j, 1:] for j in range(len(batch))]


class _Stop(Exception):
    """Another stage failed; this one unwinds quietly."""


class _Pipeline:
    def __init__(self, tasks: Sequence[ImageTask], model: LoadedModel, settings: InferSettings,
                 sink: ResultSink, report: ShardReport, imgsz: int,
                 done: Collection[str] = ()) -> None:
        # Batch groups (see the module docstring): the groups with unfinished work, whole; a
        # finished image in them is inferred again (its batch must not change) but not written.
        size = settings.batch_size
        todo_groups = {i // size for i, t in enumerate(tasks) if t.rel_path not in done}
        picked = [i for i in range(len(tasks)) if i // size in todo_groups]
        self.tasks = [tasks[i] for i in picked]
        self.group = [i // size for i in picked]
        self.replay = [tasks[i].rel_path in done for i in picked]
        self.model = model
        self.settings = settings
        self.sink = sink
        self.report = report
        self.batch_size = settings.batch_size
        threads = settings.decode_workers or max(1, os.cpu_count() or 1)
        self.configured_threads = threads  # not capped by this attempt's task count (_share_cpu)
        self.threads = max(1, min(threads, len(self.tasks)))
        report.decode_threads = self.threads
        # Annotated images are full-size frames drawn and JPEG-encoded on the writer side:
        # as costly as a decode, so they get as many threads, and shorter queues (each queued
        # item then holds the whole decoded image).
        self.writers = self.threads if settings.save_annotated else 1
        report.writers = self.writers
        capacity = settings.decoded_queue_size or (
            self.batch_size + self.threads if settings.save_annotated
            else max(2 * self.batch_size, 2 * self.threads))
        write_capacity = (min(settings.write_queue_size, 2 * self.writers)
                          if settings.save_annotated else settings.write_queue_size)
        self.decoder = Decoder(imgsz, model.stride, fast=settings.fast_decode,
                               keep_image=settings.save_annotated,
                               max_pixels=settings.max_image_pixels)
        self.permits = threading.Semaphore(capacity)  # decoded, not yet consumed
        self.ready: dict[int, DecodedImage] = {}
        self.ready_cond = threading.Condition()
        self.next_index = 0
        self.index_lock = threading.Lock()
        self.write_q: queue.Queue[Any] = queue.Queue(maxsize=write_capacity)
        self.count_lock = threading.Lock()
        self.stop_decode = threading.Event()  # decoders stop taking work
        self.stop_all = threading.Event()  # writer failed: everyone stops at once
        self.errors: list[BaseException] = []
        self.written = 0
        self.decode_s = 0.0

    # -- helpers --------------------------------------------------------------------------
    def _fail(self, exc: BaseException, everyone: bool) -> None:
        self.errors.append(exc)
        self.stop_decode.set()
        if everyone:
            self.stop_all.set()
        with self.ready_cond:
            self.ready_cond.notify_all()

    def _check(self) -> None:
        if self.stop_all.is_set() or (self.errors and self.stop_decode.is_set()):
            raise _Stop

    def _put_result(self, item: Any) -> None:
        """Blocking put that gives up only when the writer itself has failed."""
        while True:
            if self.stop_all.is_set():
                raise _Stop
            try:
                self.write_q.put(item, timeout=_SLICE_S)
                return
            except queue.Full:
                continue

    # -- decode threads -------------------------------------------------------------------
    def decode_loop(self) -> None:
        try:
            while not self.stop_decode.is_set():
                if not self.permits.acquire(timeout=_SLICE_S):
                    continue
                with self.index_lock:
                    i = self.next_index
                    self.next_index += 1
                if i >= len(self.tasks):
                    self.permits.release()
                    return
                task = self.tasks[i]
                item = self.decoder(i, task.path, task.rel_path)
                with self.ready_cond:
                    self.decode_s += item.seconds
                    self.ready[i] = item
                    self.ready_cond.notify_all()
        except BaseException as exc:  # a bug, not a bad image: stop the shard
            self._fail(exc, everyone=False)

    def _take(self, i: int) -> DecodedImage:
        with self.ready_cond:
            while i not in self.ready:
                if self.errors:
                    raise _Stop
                self.ready_cond.wait(_SLICE_S)
            item = self.ready.pop(i)
        self.permits.release()
        return item

    # -- writer thread --------------------------------------------------------------------
    def write_loop(self) -> None:
        try:
            while True:
                try:
                    entry = self.write_q.get(timeout=_SLICE_S)
                except queue.Empty:
                    if self.stop_all.is_set():
                        return
                    continue
                if entry is _END:
                    return
                item, dets = entry
                t0 = time.perf_counter()
                self.sink.write(item, dets)
                with self.count_lock:
                    self.report.write_s += time.perf_counter() - t0
                    self._count(item, dets)
        except BaseException as exc:
            self._fail(exc, everyone=True)

    def _count(self, item: DecodedImage, dets: np.ndarray | None) -> None:
        r = self.report
        r.processed += 1
        if item.error is None:
            r.ok += 1
            r.detections += 0 if dets is None else len(dets)
        else:
            r.failed += 1
            r.failures.append({"rel_path": item.rel_path, "error": item.error})
            log.warning("failed: %s: %s", item.rel_path, item.error)

    # -- main thread: batching and inference ----------------------------------------------
    def infer_batch(self, batch: list[DecodedImage]) -> list[np.ndarray]:
        import torch

        t0 = time.perf_counter()
        try:
            out = self._forward(batch)
        except torch.cuda.OutOfMemoryError:
            if len(batch) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(batch) // 2
            self.batch_size = max(1, min(self.batch_size, half))
            log.warning("GPU out of memory on a batch of %d: batch size is now %d",
                        len(batch), self.batch_size)
            self.report.infer_s += time.perf_counter() - t0
            out: list[np.ndarray] = []
            while len(out) < len(batch):  # the size may shrink again inside
                out += self.infer_batch(batch[len(out):len(out) + self.batch_size])
            return out
        self.report.infer_s += time.perf_counter() - t0
        return out

    def _forward(self, batch: list[DecodedImage]) -> list[np.ndarray]:
        st = self.settings
        return detect_batch(self.model, batch, st.conf, st.iou, st.max_det)

    def _share_cpu(self) -> None:
        """On a CPU device the model competes with the decode threads for the same cores:
        give it the cores the decoders leave (at least one) instead of oversubscribing."""
        if self.model.is_cuda:
            return
        cores = os.cpu_count() or 1
        if self.model.runtime == "openvino":
            # Measured (48 bench images, 2 cores): every core beats the leftover one, 13.2 vs
            # 12.3 img/s exact, 32.8 vs 30.4 fast: its idle workers sleep rather than spin, and
            # it soaks up the decoders' stalls and the shard's tail. Its results do not depend
            # on the thread count.
            threads = cores
        else:
            # From the configured decode threads, not those this attempt runs: a retry with a
            # few images left must not get more threads (other numbers) than the first attempt.
            threads = max(1, cores - self.configured_threads)
        self.model.set_cpu_threads(threads)
        log.debug("CPU inference (%s): %d thread(s) beside %d decode thread(s)",
                  self.model.runtime, threads, self.threads)

    def run(self) -> None:
        self._share_cpu()
        report = self.report
        decoders = [threading.Thread(target=self.decode_loop, name=f"decode-{i}")
                    for i in range(self.threads)]
        writers = [threading.Thread(target=self.write_loop, name=f"writer-{i}")
                   for i in range(self.writers)]
        for t in [*decoders, *writers]:
            t.start()
        start = time.perf_counter()
        progress = _Progress(len(self.tasks) - sum(self.replay), report.resumed,
                             self.settings.progress_every_s, lambda: self.written_total())
        try:
            batch: list[DecodedImage] = []
            for i in range(len(self.tasks)):
                item = self._take(i)
                self._check()
                if item.error is not None:
                    if not self.replay[i]:
                        self._put_result((item, None))
                    continue
                assert item.input is not None
                if batch and (len(batch) >= self.batch_size
                              or self.group[i] != self.group[batch[0].index]
                              or item.input.shape != batch[0].input.shape):
                    self._emit(batch)
                    batch = []
                batch.append(item)
                progress.maybe_log(report, time.perf_counter() - start)
            if batch:
                self._emit(batch)
            self._end_writers()
        except _Stop:
            pass
        except BaseException as exc:
            self.errors.insert(0, exc)
            self.stop_decode.set()
            # Let the writers finish what is queued (it is valid work a retry can skip).
            try:
                self._end_writers()
            except _Stop:
                pass
        finally:
            self.stop_decode.set()
            for t in [*decoders, *writers]:
                t.join()
            report.wall_s = time.perf_counter() - start
            report.decode_s = self.decode_s
            report.batch_size = self.batch_size
        if self.errors:
            raise self.errors[0]
        progress.log_final(report)

    def _end_writers(self) -> None:
        for _ in range(self.writers):
            self._put_result(_END)

    def written_total(self) -> int:
        return self.report.processed

    def _emit(self, batch: list[DecodedImage]) -> None:
        for item, dets in zip(batch, self.infer_batch(batch), strict=True):
            item.input = None  # free the model input before it waits in the write queue
            if not self.replay[item.index]:  # done by an earlier attempt: only its batch mates
                self._put_result((item, dets))


class _Progress:
    def __init__(self, total: int, resumed: int, every_s: float, done: Callable[[], int]) -> None:
        self.total, self.resumed, self.every_s, self.done = total, resumed, every_s, done
        self.last = 0.0

    def maybe_log(self, report: ShardReport, elapsed: float) -> None:
        if elapsed - self.last < self.every_s:
            return
        self.last = elapsed
        done = self.done()
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        log.info("progress %d/%d images (%d resumed) %.2f img/s, ETA %s | busy: decode %.0f%% "
                 "infer %.0f%% write %.0f%%", done + self.resumed, self.total + self.resumed,
                 self.resumed, rate, _eta(eta), 100 * report.decode_s / elapsed /
                 max(report.decode_threads, 1), 100 * report.infer_s / elapsed,
                 100 * report.write_s / elapsed)

    def log_final(self, report: ShardReport) -> None:
        busy = report.to_dict()["busy"]
        log.info("shard done on %s: %d images (%d ok, %d failed, %d resumed), %d detections, "
                 "%.1fs, %.2f img/s | busy: decode %.0f%% infer %.0f%% write %.0f%%",
                 report.device, report.processed, report.ok, report.failed, report.resumed,
                 report.detections, report.wall_s, report.images_per_s, 100 * busy["decode"],
                 100 * busy["infer"], 100 * busy["write"])


def _eta(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


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


def run_shard(tasks: Sequence[ImageTask], model: LoadedModel, settings: InferSettings,
              layout: OutputLayout, staging_path: Path | None = None,
              sink: ResultSink | None = None) -> ShardReport:
    """Run ``tasks`` through ``model`` and write every result; return what happened.

    With ``staging_path`` the shard is resumable: images an earlier attempt finished (same
    model and result-relevant settings) are skipped. Raises the first pipeline error.
    """
    imgsz = settings.imgsz or model.default_imgsz
    if sink is None:
        staging = None
        if staging_path is not None:
            fingerprint = settings.result_fingerprint(model.sha256, imgsz, model.runtime)
            staging = StagingWriter(staging_path, fingerprint,
                                    {"model_sha256": model.sha256, "model_path": str(model.path),
                                     "imgsz": imgsz, "device": str(model.device),
                                     "runtime": model.runtime,
                                     "names": {str(k): v for k, v in model.names.items()}})
        sink = OutputSink(layout, model.names, settings.save_annotated, staging)
    report = ShardReport(device=str(model.device), images=len(tasks),
                         staging_path=str(staging_path) if staging_path else None)
    done = sink.open()
    try:
        _remove_stale_temps(tasks, layout, settings.save_annotated)
        todo = [t for t in tasks if t.rel_path not in done]
        report.resumed = len(tasks) - len(todo)
        if report.resumed:
            log.info("resuming: %d of %d images already done by an earlier attempt",
                     report.resumed, len(tasks))
        if todo:
            _Pipeline(tasks, model, settings, sink, report, imgsz, done=done.keys()).run()
    finally:
        sink.close()
    return report
