"""The local backend: a folder on this host (or a mounted network file system), via pathlib.

This is what the stages always did; the object-storage backend mirrors it.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Collection
from pathlib import Path

from image_etl.storage.base import Entry, Storage, Walk, has_extension
from image_etl.storage.errors import StorageNotFoundError
from image_etl.storage.location import check_rel_path

log = logging.getLogger(__name__)


class LocalStorage(Storage):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def url(self) -> str:
        return str(self.root)

    def path(self, rel_path: str) -> Path:
        """The local file of ``rel_path`` (checked: no ``..``, not absolute)."""
        return self.root / check_rel_path(rel_path)

    def child(self, rel_path: str) -> LocalStorage:
        return LocalStorage(self.path(rel_path))

    def walk(self, extensions: Collection[str]) -> Walk:
        if not self.root.is_dir():
            raise StorageNotFoundError(f"folder does not exist or is not a folder: {self.root}")
        files: list[Entry] = []
        links: list[str] = []
        other: list[str] = []
        hidden = 0

        def on_error(err: OSError) -> None:
            log.warning("cannot list %s: %s", err.filename, err.strerror)

        for dirpath, dirnames, filenames in os.walk(self.root, onerror=on_error, followlinks=False):
            hidden += sum(d.startswith(".") for d in dirnames)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            base = Path(dirpath)
            for name in filenames:
                if name.startswith("."):
                    hidden += 1
                    continue
                path = base / name
                rel = path.relative_to(self.root).as_posix()
                if not has_extension(name, extensions):
                    other.append(rel)
                    continue
                try:
                    st = path.lstat()
                except OSError as exc:
                    log.warning("cannot stat %s: %s", rel, exc.strerror)
                    continue
                if stat.S_ISLNK(st.st_mode):
                    links.append(rel)
                elif stat.S_ISREG(st.st_mode):
                    files.append(Entry(rel, st.st_size, st.st_mtime))
        files.sort(key=lambda e: e.rel_path)
        return Walk(files, sorted(links), sorted(other), hidden)

    def read_bytes(self, rel_path: str) -> bytes:
        return self.path(rel_path).read_bytes()

    def write_atomic(self, rel_path: str, data: bytes | str) -> None:
        # The outputs' own temp-and-rename (its temp names let a later attempt tell a killed
        # writer's leftover from a live one); imported here: it brings OpenCV.
        from image_etl.atomic_files import atomic_write

        atomic_write(self.path(rel_path), data)

    def exists(self, rel_path: str) -> bool:
        return self.path(rel_path).exists()

    def remove_file(self, rel_path: str) -> None:
        self.path(rel_path).unlink(missing_ok=True)

    def remove_tree(self, rel_path: str = "") -> None:
        target = self.path(rel_path) if rel_path else self.root
        if target.is_symlink() or target.is_file():
            target.unlink(missing_ok=True)
        elif target.exists():
            shutil.rmtree(target)
