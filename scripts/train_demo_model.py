"""Train the shipped detectors on synthetic line-scan images (CPU, offline, rerunnable).

    .venv/bin/python scripts/train_demo_model.py --out models/demo-yolo11n-2cls.pt
    .venv/bin/python scripts/train_demo_model.py --defects small      # the sliced-mode model

The model is a YOLO11n (built from Ultralytics' own yolo11n.yaml, no pretrained weights, so
nothing is downloaded) with the two classes of ``image_etl.synth``. Training images are drawn
at a quarter of the drop resolution (512 x 3000), which is still ~5x more than the model sees
at imgsz 640, with varied grain and blur so that both exact and reduced-scale (fast) decoding
look familiar to it. ``rect`` batches (640 x 128) spare the CPU the padding of square mosaics.

``--defects small`` trains the model for sliced inference: the defects are 8-48 px on a
full-resolution 2048 x 12000 frame, so it learns from native-resolution tiles (320 x 320, as
sliced inference will show it) cut from JPEG-compressed full frames, most of them around a
defect, some of plain background; a box is kept in a tile when most of it lies inside.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np

from image_etl import synth

os.environ.setdefault("YOLO_OFFLINE", "1")


def make_split(root: Path, split: str, count: int, seed: int) -> None:
    images, labels = root / "images" / split, root / "labels" / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    width, height = synth.FULL_WIDTH // 4, synth.FULL_HEIGHT // 4
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        img, boxes = synth.render(rng, width, height, grain=float(rng.uniform(0, 9)))
        if rng.random() < 0.3:  # what a DCT-reduced decode looks like: grain averaged out
            img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.8, 2.0)))
        synth.write_image(images / f"{i:05d}.jpg", img, quality=int(rng.integers(80, 96)))
        synth.write_labels(labels / f"{i:05d}.txt", boxes, width, height)


def make_tile_split(root: Path, split: str, count: int, seed: int, tile: int) -> None:
    """``count`` tiles of ``tile`` px cut at native resolution from small-defect full frames."""
    images, labels = root / "images" / split, root / "labels" / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    per_frame = 16
    for f in range((count + per_frame - 1) // per_frame):
        rng = np.random.default_rng([seed, f])
        frame, boxes = synth.render(rng, grain=float(rng.uniform(2, 8)), defects="small")
        quality = int(rng.integers(80, 96))
        frame = cv2.imdecode(cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])[1],
                             cv2.IMREAD_COLOR)
        h, w = frame.shape[:2]
        for k in range(min(per_frame, count - f * per_frame)):
            if boxes and rng.random() < 0.8:  # around a defect, anywhere in the tile
                b = boxes[int(rng.integers(len(boxes)))]
                x0 = int(np.clip((b.x1 + b.x2) / 2 - rng.uniform(0.1, 0.9) * tile, 0, w - tile))
                y0 = int(np.clip((b.y1 + b.y2) / 2 - rng.uniform(0.1, 0.9) * tile, 0, h - tile))
            else:
                x0, y0 = int(rng.integers(0, w - tile + 1)), int(rng.integers(0, h - tile + 1))
            inside = []
            for b in boxes:
                cx1, cy1 = max(b.x1, x0), max(b.y1, y0)
                cx2, cy2 = min(b.x2, x0 + tile), min(b.y2, y0 + tile)
                if cx2 <= cx1 or cy2 <= cy1:
                    continue
                if (cx2 - cx1) * (cy2 - cy1) >= 0.6 * (b.x2 - b.x1) * (b.y2 - b.y1):
                    inside.append(synth.Box(b.cls, cx1 - x0, cy1 - y0, cx2 - x0, cy2 - y0))
            name = f"{f:04d}_{k:02d}"
            cv2.imwrite(str(images / f"{name}.png"), frame[y0:y0 + tile, x0:x0 + tile])
            synth.write_labels(labels / f"{name}.txt", inside, tile, tile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/demo-yolo11n-2cls.pt"))
    parser.add_argument("--work", type=Path, default=Path("runs/demo-train"))
    parser.add_argument("--train", type=int, default=800)
    parser.add_argument("--val", type=int, default=80)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--defects", choices=("large", "small"), default="large",
                        help="small: the sliced-mode model, on native-resolution tiles")
    parser.add_argument("--tile", type=int, default=320, help="--defects small: tile size")
    args = parser.parse_args()
    small = args.defects == "small"
    if small and args.out == parser.get_default("out"):
        args.out = Path(f"models/small-defects-yolo11n-{args.tile}.pt")
    if small and args.work == parser.get_default("work"):
        args.work = Path("runs/small-defects-train")
    if small and args.imgsz == parser.get_default("imgsz"):
        args.imgsz = args.tile

    data_root = args.work.resolve() / "data"
    if data_root.exists():
        shutil.rmtree(data_root)
    t0 = time.perf_counter()
    if small:
        make_tile_split(data_root, "train", args.train, args.seed, args.tile)
        make_tile_split(data_root, "val", args.val, args.seed + 1, args.tile)
    else:
        make_split(data_root, "train", args.train, args.seed)
        make_split(data_root, "val", args.val, args.seed + 1)
    yaml = data_root / "data.yaml"
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(synth.CLASS_NAMES))
    yaml.write_text(f"path: {data_root}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    print(f"data: {args.train}+{args.val} images in {time.perf_counter() - t0:.0f}s", flush=True)

    from ultralytics import YOLO

    model = YOLO("yolo11n.yaml")
    # Small defects: square tiles, mosaics at a mild scale jitter (a 8 px pit must not shrink
    # to nothing), the last epochs without mosaic.
    shape = ({"rect": False, "scale": 0.25, "close_mosaic": max(1, args.epochs // 5)} if small
             else {"rect": True, "close_mosaic": 0})
    model.train(
        data=str(yaml), imgsz=args.imgsz, epochs=args.epochs, batch=args.batch, device="cpu",
        workers=2, seed=args.seed, deterministic=False, plots=False, amp=False,
        project=str(args.work.resolve()), name="train", exist_ok=True, pretrained=False,
        flipud=0.5, fliplr=0.5, hsv_v=0.3, patience=100, verbose=False, **shape,
    )
    best = args.work.resolve() / "train" / "weights" / "best.pt"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) "
          f"in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
