"""The file-system seam every stage goes through: one root (a folder or a bucket prefix) and
paths relative to it.

Listing rules (the same for both backends, and what discover always did):
- recursive; only files whose extension (case-insensitive) is in ``extensions``;
- hidden names (a path part starting with ``.``) are skipped: uploaders write temp files so;
- links are reported, never followed (local only: object stores have none);
- object-store directory markers (keys ending in ``/``) are ignored;
- every file carries its size and modification time (an object's last-modified time), so the
  caller can leave files modified in the last ``settle_seconds`` for the next run;
- the order is by relative path.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Collection


@dataclasses.dataclass(frozen=True)
class Entry:
    rel_path: str  # POSIX path relative to the root
    size: int
    mtime: float  # seconds since the epoch (an object's LastModified)


@dataclasses.dataclass
class Walk:
    files: list[Entry]  # known extensions, sorted by rel_path
    links: list[str]  # symbolic links: reported, never followed
    other: list[str]  # not hidden, but an unknown extension
    hidden: int = 0  # hidden files skipped; a hidden folder counts as one, whatever it holds


def has_extension(name: str, extensions: Collection[str]) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in extensions


def hidden_part(rel_path: str) -> str | None:
    """The path up to its first hidden part (``a/.tmp`` of ``a/.tmp/b.jpg``), None if none."""
    parts = rel_path.split("/")
    for i, part in enumerate(parts):
        if part.startswith("."):
            return "/".join(parts[: i + 1])
    return None


class Storage(abc.ABC):
    """A root folder or bucket prefix; every ``rel_path`` is relative to it."""

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The root as users write it (a path, or ``s3://bucket/prefix`` without credentials)."""

    @abc.abstractmethod
    def child(self, rel_path: str) -> Storage:
        """The same storage rooted at ``rel_path`` (a run folder under the output root)."""

    def display(self, rel_path: str = "") -> str:
        """One file's location for messages and records (no credentials)."""
        return f"{self.url.rstrip('/')}/{rel_path}" if rel_path else self.url

    @abc.abstractmethod
    def walk(self, extensions: Collection[str]) -> Walk:
        """Every file under the root (see the module's listing rules). A missing root is
        StorageNotFoundError for a folder, an empty Walk for a prefix (prefixes are not
        objects); a missing bucket is StorageNotFoundError."""

    @abc.abstractmethod
    def read_bytes(self, rel_path: str) -> bytes:
        """The whole file; StorageNotFoundError / StorageAccessError name it."""

    @abc.abstractmethod
    def write_atomic(self, rel_path: str, data: bytes | str) -> None:
        """Create or replace the file so that readers see the old or the new content, never a
        part (local: temp file + rename; object store: one PUT). Parent folders are made."""

    @abc.abstractmethod
    def exists(self, rel_path: str) -> bool:
        """The file exists (a drop-ready marker). Errors other than "not there" raise."""

    @abc.abstractmethod
    def remove_file(self, rel_path: str) -> None:
        """Remove one file / object; not there is not an error."""

    @abc.abstractmethod
    def remove_tree(self, rel_path: str = "") -> None:
        """Remove the folder / every key under the prefix; nothing there is not an error."""
