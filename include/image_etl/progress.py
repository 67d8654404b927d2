"""The shard's progress line in the task log: images done, img/s, ETA, each stage's busy share."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("image_etl.worker")  # the worker's lines, as they always were


class Progress:
    """The task log's progress line: images done, img/s, ETA and each stage's busy share."""

    def __init__(self, total: int, report: Any, every_s: float) -> None:  # a ShardReport
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
