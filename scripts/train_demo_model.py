"""Train the shipped demo detector on synthetic line-scan images (CPU, offline, rerunnable).

    .venv/bin/python scripts/train_demo_model.py --out models/demo-yolo11n-2cls.pt

The model is a YOLO11n (built from Ultralytics' own yolo11n.yaml, no pretrained weights, so
nothing is downloaded) with the two classes of ``image_etl.synth``. Training images are drawn
at a quarter of the drop resolution (512 x 3000), which is still ~5x more than the model sees
at imgsz 640, with varied grain and blur so that both exact and reduced-scale (fast) decoding
look familiar to it. ``rect`` batches (640 x 128) spare the CPU the padding of square mosaics.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from image_etl import synth  # noqa: E402


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
    args = parser.parse_args()

    data_root = args.work.resolve() / "data"
    if data_root.exists():
        shutil.rmtree(data_root)
    t0 = time.perf_counter()
    make_split(data_root, "train", args.train, args.seed)
    make_split(data_root, "val", args.val, args.seed + 1)
    yaml = data_root / "data.yaml"
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(synth.CLASS_NAMES))
    yaml.write_text(f"path: {data_root}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    print(f"data: {args.train}+{args.val} images in {time.perf_counter() - t0:.0f}s", flush=True)

    from ultralytics import YOLO

    model = YOLO("yolo11n.yaml")
    model.train(
        data=str(yaml), imgsz=args.imgsz, epochs=args.epochs, batch=args.batch, device="cpu",
        rect=True, workers=2, seed=args.seed, deterministic=False, plots=False, amp=False,
        project=str(args.work.resolve()), name="train", exist_ok=True, pretrained=False,
        flipud=0.5, fliplr=0.5, hsv_v=0.3, close_mosaic=0, patience=100, verbose=False,
    )
    best = args.work.resolve() / "train" / "weights" / "best.pt"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) "
          f"in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
