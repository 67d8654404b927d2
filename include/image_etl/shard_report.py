"""What a shard did (``ShardReport``: counts, timings, each stage's busy share) and the task
log's lines about it while it runs (``ProgressLog``)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from image_etl.decode import DecodedImage

# The shard's lines keep the logger they always had: deployments filter and tests read it.
log = logging.getLogger("image_etl.worker")


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

    def busy(self, elapsed: float | None = None) -> dict[str, float]:
        """Each stage's busy fraction of ``elapsed`` (default: the shard's wall time)."""
        wall = (elapsed if elapsed is not None else self.wall_s) or float("nan")
        return {"decode": self.decode_s / wall / max(self.decode_threads, 1),
                "infer": self.infer_s / wall,
                "write": self.write_s / wall / max(self.writers, 1)}

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "images_per_s": round(self.images_per_s, 3),
                "busy": {k: round(v, 3) for k, v in self.busy().items()}}

    def count(self, item: DecodedImage, dets: np.ndarray | None) -> None:
        """One image written by this attempt (its failure, with its reason, logged)."""
        self.processed += 1
        if item.error is None:
            self.ok += 1
            self.detections += 0 if dets is None else len(dets)
        else:
            self.failed += 1
            self.failures.append({"rel_path": item.rel_path, "error": item.error})
            log.warning("failed: %s: %s", item.rel_path, item.error)


class ProgressLog:
    """The task log's progress line: images done, img/s, ETA and each stage's busy share."""

    def __init__(self, total: int, report: ShardReport, every_s: float) -> None:
        self.total, self.report, self.every_s = total, report, every_s
        self.last = 0.0

    def maybe_log(self, elapsed: float) -> None:
        if elapsed - self.last < self.every_s:
            return
        self.last = elapsed
        r = self.report
        done = r.processed
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        busy = r.busy(elapsed)
        log.info("progress %d/%d images (%d resumed) %.2f img/s, ETA %s | busy: decode %.0f%% "
                 "infer %.0f%% write %.0f%%", done + r.resumed, self.total + r.resumed,
                 r.resumed, rate, eta_text(eta), 100 * busy["decode"], 100 * busy["infer"],
                 100 * busy["write"])

    def log_final(self) -> None:
        r = self.report
        busy = r.busy()
        log.info("shard done on %s: %d images (%d ok, %d failed, %d resumed), %d detections, "
                 "%.1fs, %.2f img/s | busy: decode %.0f%% infer %.0f%% write %.0f%%",
                 r.device, r.processed, r.ok, r.failed, r.resumed, r.detections, r.wall_s,
                 r.images_per_s, 100 * busy["decode"], 100 * busy["infer"], 100 * busy["write"])


def eta_text(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
