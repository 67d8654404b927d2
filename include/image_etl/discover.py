"""Drop listing: which files of a drop are images ready to process.

Rules (the same for the CLI and the DAG):
- recursive; known image extensions only (case-insensitive);
- hidden files and folders (``.name``) are skipped: uploaders write temp files that way;
  they and files of other extensions are counted (a hidden folder counts as one), not listed;
- symbolic links are never followed (a link could point anywhere on the host);
- a file modified less than ``settle_s`` ago may still be being written: it is left for the
  next run rather than read half-written;
- the order is by relative path, so manifests and shards are deterministic.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import time
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


@dataclasses.dataclass(frozen=True)
class FoundImage:
    rel_path: str  # POSIX path relative to the drop root: the image's identity
    bytes: int
    mtime: float


@dataclasses.dataclass
class Listing:
    images: list[FoundImage]
    unsettled: list[str]  # too recently modified: next run
    skipped_links: list[str]
    # Counted so that a report accounts for every file of the drop, not only its images.
    skipped_unknown: int = 0  # regular files without a known image extension
    skipped_hidden: int = 0  # ``.name`` files (uploaders' temp files), and in ``.name`` folders


def list_images(root: Path, settle_s: float = 0.0, now: float | None = None) -> Listing:
    """Every image file under ``root`` (see the module rules)."""
    if not root.is_dir():
        raise FileNotFoundError(f"drop folder does not exist or is not a folder: {root}")
    now = time.time() if now is None else now
    images: list[FoundImage] = []
    unsettled: list[str] = []
    links: list[str] = []
    unknown = hidden = 0

    def on_error(err: OSError) -> None:
        log.warning("cannot list %s: %s", err.filename, err.strerror)

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=False):
        hidden += sum(d.startswith(".") for d in dirnames)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        for name in filenames:
            if name.startswith("."):
                hidden += 1
                continue
            if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                unknown += 1
                continue
            path = base / name
            rel = path.relative_to(root).as_posix()
            try:
                st = path.lstat()
            except OSError as exc:
                log.warning("cannot stat %s: %s", rel, exc.strerror)
                continue
            if stat.S_ISLNK(st.st_mode):
                links.append(rel)
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if now - st.st_mtime < settle_s:
                unsettled.append(rel)
                continue
            images.append(FoundImage(rel, st.st_size, st.st_mtime))
    images.sort(key=lambda f: f.rel_path)
    if links:
        log.info("skipped %d symbolic link(s), e.g. %s", len(links), links[0])
    if unsettled:
        log.info("left %d file(s) modified in the last %.0fs for the next run, e.g. %s",
                 len(unsettled), settle_s, unsettled[0])
    return Listing(images, sorted(unsettled), sorted(links), unknown, hidden)
