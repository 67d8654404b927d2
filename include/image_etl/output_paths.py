"""Where a worker's outputs go: txt files and annotated images, confined to the output root."""

from __future__ import annotations

import dataclasses
from pathlib import Path


class OutputPathError(ValueError):
    """A file name would place an output outside the output root."""


@dataclasses.dataclass(frozen=True)
class OutputLayout:
    """Where outputs go. ``root/labels/<rel>.txt`` and ``root/annotated/<rel>``, mirroring the
    drop's relative paths; or, with ``beside_images``, ``<image>.txt`` next to each image (the
    original script's layout)."""

    root: Path
    beside_images: bool = False

    def _inside(self, base: Path, rel_path: str, suffix: str | None) -> Path:
        rel = Path(rel_path)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise OutputPathError(f"refusing output path for {rel_path!r}: not a plain relative path")
        target = base / (rel.with_suffix(suffix) if suffix is not None else rel)
        if not target.resolve().is_relative_to(base.resolve()):
            raise OutputPathError(f"refusing output path for {rel_path!r}: escapes {base}")
        return target

    def txt_path(self, rel_path: str, image_path: Path | None) -> Path:
        if self.beside_images:
            if image_path is None:
                raise OutputPathError(f"no txt beside {rel_path!r}: it is not a local file")
            return image_path.with_suffix(".txt")
        return self._inside(self.root / "labels", rel_path, ".txt")

    def annotated_path(self, rel_path: str) -> Path:
        return self._inside(self.root / "annotated", rel_path, ".jpg")
