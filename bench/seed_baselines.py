"""The original post's two designs, kept faithful, as the benchmark's baselines.

``seed-original`` (the post's first script): one process per device; per image
``model.predict(path, save=...)``, then the image's txt lines are built from the ``Results``
and the txt file is written synchronously before the next image starts.

``seed-queue`` (the post's fix): the same loop, but ``(txt_filename, lines)`` goes on a
``Queue(maxsize=200)`` with ``put(timeout=0.1)``, and a writer thread (``get(timeout=1)``,
``None`` ends it) writes the files.

Only measurement is added, never behaviour: the time spent in Ultralytics' ``imread`` (read +
full decode inside ``predict``), the per-image model times Ultralytics itself reports in
``Results.speed`` (letterbox + forward + NMS), the time spent drawing and saving annotated
images inside ``predict`` (``save=True``) and the time spent building and writing txt lines.
The txt lines are what Ultralytics' ``Results.save_txt(save_conf=True)`` writes
(``cls xc yc w h conf``, ``%g``), built the same way (box by box).

One deliberate difference: the post's writer thread is a daemon that is never joined (its
files may be lost when the process ends); here the benchmark waits for it, so the timed
section ends only when every txt file is on disk, as it does for the other variants.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class SeedTimes:
    """What one timed pass of a seed design did and where its time went (seconds)."""

    images: int = 0
    detections: int = 0
    wall_s: float = 0.0
    predict_s: float = 0.0  # total time inside model.predict
    decode_s: float = 0.0  # read + decode (Ultralytics' imread), inside predict
    infer_s: float = 0.0  # letterbox + forward + NMS/results (Results.speed), inside predict
    annotate_s: float = 0.0  # draw + encode + save the annotated image, inside predict (save=True)
    format_s: float = 0.0  # build the txt lines from Results (GPU → CPU copies, box by box)
    write_s: float = 0.0  # open/write/close the txt files (main thread or writer thread)
    dropped: int = 0  # results the post's put(timeout=0.1) would have lost (queue full)

    def busy(self) -> dict[str, float]:
        """Per-stage busy fractions of the wall time (each stage here runs on one thread)."""
        wall = self.wall_s or float("nan")
        return {"decode": self.decode_s / wall, "infer": self.infer_s / wall,
                "write": (self.annotate_s + self.format_s + self.write_s) / wall}


def txt_lines(result: Any) -> list[str]:
    """One image's txt lines as ``Results.save_txt(save_conf=True)`` builds them."""
    lines = []
    for d in result.boxes:
        c, conf = int(d.cls), float(d.conf)
        line = (c, *d.xywhn.view(-1), conf)
        lines.append(("%g " * len(line)).rstrip() % line + "\n")
    return lines


class _Timer:
    """Wraps a function and sums the seconds spent in it."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


class SeedRunner:
    """One device's worker of the post's script: the model loaded once, images one by one.

    ``out_dir/labels/<rel>.txt`` takes the txt files (the post wrote them beside the images;
    same work, and the benchmark drop stays clean); annotated images go to
    ``out_dir/predict/`` (Ultralytics' ``save_dir``).
    """

    def __init__(self, model_path: Path, device: str, imgsz: int, conf: float, iou: float,
                 save: bool, out_dir: Path) -> None:
        from ultralytics import YOLO

        self.model = YOLO(str(model_path))
        self.device = device
        self.imgsz = imgsz
        self.conf = conf
        self.iou = iou
        self.save = save
        self.out_dir = out_dir
        self._imread: _Timer | None = None
        self._annotate: _Timer | None = None

    def predict(self, path: Path) -> list[Any]:
        return self.model.predict(str(path), imgsz=self.imgsz, conf=self.conf, iou=self.iou,
                                  save=self.save, verbose=False, device=self.device,
                                  project=str(self.out_dir), name="predict", exist_ok=True)

    def txt_path(self, rel_path: str) -> Path:
        return self.out_dir / "labels" / Path(rel_path).with_suffix(".txt")

    def warmup(self, path: Path) -> None:
        """First predict builds the predictor and warms the model; then the probes go in."""
        self.predict(path)
        self._instrument()

    def _instrument(self) -> None:
        import ultralytics.data.loaders as loaders

        if self._imread is None:
            self._imread = _Timer(loaders.imread)
            loaders.imread = self._imread  # what LoadImagesAndVideos calls per image
        predictor = self.model.predictor
        assert predictor is not None
        self._annotate = _Timer(predictor.write_results)  # plot + imwrite when save=True
        predictor.write_results = self._annotate  # type: ignore[method-assign]

    def _collect(self, times: SeedTimes, predictor: Any) -> None:
        if self.model.predictor is not predictor:
            raise RuntimeError("Ultralytics rebuilt its predictor during the timed pass: the "
                               "decode/annotate probes missed part of it")
        assert self._imread is not None and self._annotate is not None
        times.decode_s = self._imread.seconds
        times.annotate_s = self._annotate.seconds if self.save else 0.0

    def _reset_probes(self) -> Any:
        assert self._imread is not None and self._annotate is not None
        self._imread.seconds = 0.0
        self._annotate.seconds = 0.0
        return self.model.predictor

    def _predict_lines(self, path: Path, times: SeedTimes) -> list[str]:
        """One image through ``predict`` and into txt lines, the same in both designs."""
        t0 = time.perf_counter()
        results = self.predict(path)
        t1 = time.perf_counter()
        lines = [line for result in results for line in txt_lines(result)]
        times.predict_s += t1 - t0
        times.format_s += time.perf_counter() - t1
        times.infer_s += sum(sum(r.speed.values()) for r in results) / 1e3
        times.images += 1
        times.detections += len(lines)
        return lines

    def run_original(self, tasks: Sequence[tuple[Path, str]]) -> SeedTimes:
        """The post's first script: predict, then write the txt, image after image."""
        times = SeedTimes()
        predictor = self._reset_probes()
        start = time.perf_counter()
        for path, rel_path in tasks:
            lines = self._predict_lines(path, times)
            t0 = time.perf_counter()
            txt = self.txt_path(rel_path)
            txt.parent.mkdir(parents=True, exist_ok=True)
            with open(txt, "w") as f:
                f.writelines(lines)
            times.write_s += time.perf_counter() - t0
        times.wall_s = time.perf_counter() - start
        self._collect(times, predictor)
        return times

    def run_queue(self, tasks: Sequence[tuple[Path, str]]) -> SeedTimes:
        """The post's improved design: txt writes through Queue(maxsize=200) + a writer thread."""
        times = SeedTimes()
        predictor = self._reset_probes()
        write_queue: queue.Queue[tuple[Path, list[str]] | None] = queue.Queue(maxsize=200)
        writer_state = {"write_s": 0.0, "written": 0}
        writer = threading.Thread(target=_file_writer_thread, args=(write_queue, writer_state),
                                  name="seed-writer", daemon=True)
        start = time.perf_counter()
        writer.start()
        for path, rel_path in tasks:
            lines = self._predict_lines(path, times)
            txt = self.txt_path(rel_path)
            txt.parent.mkdir(parents=True, exist_ok=True)
            try:
                write_queue.put((txt, lines), timeout=0.1)  # as in the post
            except queue.Full:
                times.dropped += 1  # the post's put would raise here and lose this result
        write_queue.put(None)  # the post's end signal
        writer.join()
        times.wall_s = time.perf_counter() - start
        times.write_s = writer_state["write_s"]
        self._collect(times, predictor)
        if writer_state["written"] + times.dropped != times.images:
            raise RuntimeError(f"seed-queue writer wrote {writer_state['written']} of "
                               f"{times.images} files")
        return times


def _file_writer_thread(write_queue: queue.Queue[tuple[Path, list[str]] | None],
                        state: dict[str, float]) -> None:
    """The post's writer: get(timeout=1), None ends it, write the lines to the file."""
    while True:
        try:
            item = write_queue.get(timeout=1)
        except queue.Empty:
            continue
        if item is None:
            break
        filename, lines = item
        t0 = time.perf_counter()
        with open(filename, "w") as f:
            f.writelines(lines)
        state["write_s"] += time.perf_counter() - t0
        state["written"] += 1
