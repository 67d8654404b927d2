"""Synthetic line-scan drops with ground truth, for the demo, the tests and the benchmarks.

A drop image imitates a line-scan camera over a moving strip: a 2048-px sensor line scanned
12000 times (width 2048, height 12000), with per-column gain streaks, slow illumination drift
and sensor grain. Two kinds of defect are painted on it:

- class 0 ``spot``:  a dark, roughly round blob with a lighter rim;
- class 1 ``patch``: a bright rectangle crossed by darker hatching.

Sizes are given for a 2048-px-wide image and scale with the width, so the same generator makes
full-size drops and the small training images of the demo model.

``defects="small"`` paints the same two kinds at 8-48 px on a full-resolution frame (pits and
small inclusions, the defects that a whole-image pass at imgsz 640 shrinks to a pixel or two
and that sliced inference is for); they do not scale with the width, so tiles cut from a
frame keep their native size. Labels are YOLO txt
(``cls xc yc w h``, normalised) and are kept outside the image tree: ``DIR/<date>/x.jpg`` has
its truth in ``DIR/ground_truth/<date>/x.txt``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import cv2
import numpy as np

CLASS_NAMES: tuple[str, ...] = ("spot", "patch")
FULL_WIDTH = 2048
FULL_HEIGHT = 12000
GROUND_TRUTH_DIR = "ground_truth"


@dataclasses.dataclass(frozen=True)
class Box:
    cls: int
    x1: float
    y1: float
    x2: float
    y2: float

    def yolo_line(self, width: int, height: int) -> str:
        xc = (self.x1 + self.x2) / 2 / width
        yc = (self.y1 + self.y2) / 2 / height
        w = (self.x2 - self.x1) / width
        h = (self.y2 - self.y1) / height
        return f"{self.cls} {xc:.6f} {yc:.6f} {w:.6f} {h:.6f}"


def _background(rng: np.random.Generator, width: int, height: int, grain: float) -> np.ndarray:
    """Textured strip: column streaks x slow illumination + grain, as uint8 BGR."""
    base = rng.uniform(95, 150)
    # Per-column gain: a smooth profile plus fine streaks, the signature of a line sensor.
    smooth = cv2.resize(rng.normal(0, 10, (1, 24)).astype(np.float32), (width, 1),
                        interpolation=cv2.INTER_CUBIC)[0]
    streaks = rng.normal(0, 4, width).astype(np.float32)
    columns = base + smooth + streaks
    # Slow 2-D illumination drift along the scan.
    drift = cv2.resize(rng.normal(0, 8, (max(2, height // 500), 8)).astype(np.float32),
                       (width, height), interpolation=cv2.INTER_CUBIC)
    gray: np.ndarray = np.asarray(drift, dtype=np.float32)
    gray += columns[None, :]
    if grain > 0:
        noise = rng.standard_normal((height, width), dtype=np.float32)
        noise *= grain
        gray += noise
    np.clip(gray, 0, 255, out=gray)
    gray8 = gray.astype(np.uint8)
    tint = rng.uniform(0.9, 1.1, 3)
    return cv2.merge([cv2.convertScaleAbs(gray8, alpha=float(t)) for t in tint])


def _overlaps(box: tuple[float, float, float, float], boxes: list[Box], margin: float) -> bool:
    x1, y1, x2, y2 = box
    return any(x1 < b.x2 + margin and b.x1 < x2 + margin and y1 < b.y2 + margin
               and b.y1 < y2 + margin for b in boxes)


def _paint_spot(img: np.ndarray, rng: np.random.Generator, cx: float, cy: float,
                ax: float, ay: float) -> None:
    level = int(rng.uniform(15, 55))
    rim = int(rng.uniform(170, 215))
    thickness = max(2, int(min(ax, ay) * 0.12))
    center = (int(round(cx)), int(round(cy)))
    axes = (int(round(ax)), int(round(ay)))
    cv2.ellipse(img, center, axes, 0, 0, 360, (level, level, level), -1, cv2.LINE_AA)
    cv2.ellipse(img, center, axes, 0, 0, 360, (rim, rim, rim), thickness, cv2.LINE_AA)


def _paint_patch(img: np.ndarray, rng: np.random.Generator, x1: int, y1: int, x2: int,
                 y2: int) -> None:
    fill = int(rng.uniform(205, 245))
    line = int(rng.uniform(40, 90))
    cv2.rectangle(img, (x1, y1), (x2, y2), (fill, fill, fill), -1)
    step = max(4, (x2 - x1) // 5)
    thickness = max(1, step // 4)
    for x in range(x1 + step, x2 - step // 2, step):
        cv2.line(img, (x, y1), (x, y2), (line, line, line), thickness)
    for y in range(y1 + step, y2 - step // 2, step):
        cv2.line(img, (x1, y), (x2, y), (line, line, line), thickness)


DEFECT_SIZES = {"large": (260.0, 560.0), "small": (8.0, 48.0)}  # px, in a 2048-wide frame
DEFECT_COUNTS = {"large": (3, 10), "small": (12, 40)}


def render(rng: np.random.Generator, width: int = FULL_WIDTH, height: int = FULL_HEIGHT,
           objects: tuple[int, int] | None = None, grain: float = 5.0,
           defects: str = "large") -> tuple[np.ndarray, list[Box]]:
    """One image and its boxes (pixel coordinates, exclusive right/bottom edges)."""
    img = _background(rng, width, height, grain)
    lo, hi = DEFECT_SIZES[defects]
    # Large defects scale with the frame (small training images); small ones keep their size.
    scale = width / FULL_WIDTH if defects == "large" else 1.0
    boxes: list[Box] = []
    objects = objects or DEFECT_COUNTS[defects]
    wanted = int(rng.integers(objects[0], objects[1] + 1))
    tries = 0
    while len(boxes) < wanted and tries < wanted * 50:
        tries += 1
        cls = int(rng.integers(0, len(CLASS_NAMES)))
        bw = rng.uniform(lo, hi) * scale
        bh = min(hi * scale, max(lo * scale, bw * rng.uniform(0.65, 1.5)))
        if bw >= width * 0.9 or bh >= height * 0.9:
            continue
        x1 = rng.uniform(0, width - bw)
        y1 = rng.uniform(0, height - bh)
        candidate = (x1, y1, x1 + bw, y1 + bh)
        if _overlaps(candidate, boxes, margin=40 * scale):
            continue
        if cls == 0:
            ax, ay = bw / 2, bh / 2
            cx, cy = x1 + ax, y1 + ay
            _paint_spot(img, rng, cx, cy, ax, ay)
            box = Box(0, cx - ax, cy - ay, cx + ax, cy + ay)
        else:
            ix1, iy1 = int(round(x1)), int(round(y1))
            ix2, iy2 = int(round(x1 + bw)), int(round(y1 + bh))
            _paint_patch(img, rng, ix1, iy1, ix2, iy2)
            box = Box(1, ix1, iy1, ix2 + 1, iy2 + 1)
        boxes.append(box)
    return img, boxes


def write_image(path: Path, img: np.ndarray, quality: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path}")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.tobytes())
    tmp.replace(path)


def write_labels(path: Path, boxes: list[Box], width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(b.yolo_line(width, height) + "\n" for b in boxes))


def read_labels(path: Path, width: int, height: int) -> list[Box]:
    """YOLO label file → pixel boxes (also reads our txt outputs: a 6th column is ignored)."""
    boxes = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        cls, xc, yc, w, h = int(parts[0]), *map(float, parts[1:5])
        boxes.append(Box(cls, (xc - w / 2) * width, (yc - h / 2) * height,
                         (xc + w / 2) * width, (yc + h / 2) * height))
    return boxes


def make_drop(root: Path, date: dt.date, count: int, *, width: int = FULL_WIDTH,
              height: int = FULL_HEIGHT, seed: int = 0, quality: int = 90,
              prefix: str = "scan", defects: str = "large") -> list[Path]:
    """Write ``count`` images under ``root/<date>/`` and their truth under ``root/ground_truth``.

    Deterministic for a given (seed, date, index): re-running rewrites the same files.
    """
    day = date.isoformat()
    image_dir = root / day
    truth_dir = root / GROUND_TRUTH_DIR / day
    paths = []
    for i in range(count):
        rng = np.random.default_rng([seed, date.toordinal(), i])
        img, boxes = render(rng, width, height, defects=defects)
        name = f"{prefix}_{i:05d}"
        path = image_dir / f"{name}.jpg"
        write_image(path, img, quality)
        write_labels(truth_dir / f"{name}.txt", boxes, width, height)
        paths.append(path)
    return paths


def truth_path(root: Path, date: dt.date, image_name: str) -> Path:
    return root / GROUND_TRUTH_DIR / date.isoformat() / (Path(image_name).stem + ".txt")


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def count_matches(preds: list[tuple[int, tuple[float, ...]]], truth: list[Box],
                  threshold: float = 0.5) -> int:
    """Predictions (class, x1 y1 x2 y2) matched one to one to true boxes of their class at
    IoU >= ``threshold``, greedily in the given order (best first); the number matched."""
    used: set[int] = set()
    hits = 0
    for cls, box in preds:
        best, best_j = threshold, None
        for j, t in enumerate(truth):
            if j in used or t.cls != cls:
                continue
            value = box_iou(box, (t.x1, t.y1, t.x2, t.y2))
            if value >= best:
                best, best_j = value, j
        if best_j is not None:
            used.add(best_j)
            hits += 1
    return hits
