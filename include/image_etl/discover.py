"""Drop listing: which files of a drop are images ready to process.

Rules (the same for the CLI and the DAG):
- recursive; known image extensions only (case-insensitive);
- hidden files and folders (``.name``) are skipped: uploaders write temp files that way;
  they and files of other extensions are counted (a hidden folder counts as one), not listed;
- symbolic links are never followed (a link could point anywhere on the host);
- on object storage (``s3://``), directory markers are ignored and listing is by prefix;
- a file modified less than ``settle_s`` ago may still be being written: it is left for the
  next run rather than read half-written;
- the order is by relative path, so manifests and shards are deterministic.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from image_etl.storage import LocalStorage, Storage

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


def list_images(root: Path | Storage, settle_s: float = 0.0, now: float | None = None) -> Listing:
    """Every image file under ``root`` (see the module rules): a folder, or a storage from
    ``image_etl.storage.open_storage`` (an ``s3://`` prefix: an object's last-modified time is
    its mtime; a prefix with no objects is an empty drop, a missing bucket an error)."""
    if isinstance(root, Path) and not root.is_dir():
        raise FileNotFoundError(f"drop folder does not exist or is not a folder: {root}")
    now = time.time() if now is None else now
    walk = (LocalStorage(root) if isinstance(root, Path) else root).walk(IMAGE_EXTENSIONS)
    images: list[FoundImage] = []
    unsettled: list[str] = []
    for entry in walk.files:
        if now - entry.mtime < settle_s:
            unsettled.append(entry.rel_path)
        else:
            images.append(FoundImage(entry.rel_path, entry.size, entry.mtime))
    links = walk.links
    if links:
        log.info("skipped %d symbolic link(s), e.g. %s", len(links), links[0])
    if unsettled:
        log.info("left %d file(s) modified in the last %.0fs for the next run, e.g. %s",
                 len(unsettled), settle_s, unsettled[0])
    return Listing(images, sorted(unsettled), sorted(links), len(walk.other), walk.hidden)
