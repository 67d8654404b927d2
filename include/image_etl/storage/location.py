"""Where a drop or an output lives: a local absolute path or an object-storage URL.

URLs follow Airflow's ``ObjectStoragePath``: ``s3://bucket/prefix`` uses the deployment's
default connection, ``s3://conn_id@bucket/prefix`` names one. Only the connection *id* is
ever in a URL: credentials come from the connection, never from the text.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from pathlib import Path

from image_etl.storage.errors import StorageConfigError

OBJECT_SCHEMES = frozenset({"s3"})
# Bucket names per the S3 rules (3-63 chars, lowercase, digits, dots, hyphens); an Airflow
# connection id is letters, digits and ``_.-``.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_CONN_ID = re.compile(r"[A-Za-z0-9_.-]+")
_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://(?P<rest>.*)", re.S)


def is_url(text: str) -> bool:
    """True for ``scheme://...`` text (a URL, supported or not), False for a path."""
    return _URL.fullmatch(text.strip()) is not None


@dataclasses.dataclass(frozen=True)
class ObjectLocation:
    """``scheme://[conn_id@]bucket/prefix``; ``prefix`` has no leading or trailing slash."""

    scheme: str
    bucket: str
    prefix: str = ""
    conn_id: str | None = None

    @property
    def url(self) -> str:
        """The URL without the connection id: what messages, records and logs show."""
        return f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")

    @property
    def spec(self) -> str:
        """The URL with its connection id (never a credential): how settings carry it between
        tasks, so that every task reaches the bucket through the same connection."""
        if self.conn_id is None:
            return self.url
        return f"{self.scheme}://{self.conn_id}@{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, rel_path: str = "") -> str:
        """The object key of ``rel_path`` under the prefix."""
        return "/".join(p for p in (self.prefix, rel_path) if p)

    def child(self, rel_path: str) -> ObjectLocation:
        return dataclasses.replace(self, prefix=self.key(check_rel_path(rel_path)))

    def is_relative_to(self, other: ObjectLocation) -> bool:
        """Under ``other`` (same scheme and bucket, prefix at a ``/`` boundary)."""
        if (self.scheme, self.bucket) != (other.scheme, other.bucket):
            return False
        return not other.prefix or self.prefix == other.prefix or \
            self.prefix.startswith(other.prefix + "/")

    def __str__(self) -> str:
        return self.url


def parse_object_url(text: str) -> ObjectLocation:
    """``s3://[conn_id@]bucket/prefix`` -> :class:`ObjectLocation`; StorageConfigError if not."""
    m = _URL.fullmatch(text.strip())
    if m is None:
        raise StorageConfigError(f"not a storage URL: {text!r} (expected s3://bucket/prefix)")
    scheme, rest = m["scheme"].lower(), m["rest"]
    if scheme not in OBJECT_SCHEMES:
        raise StorageConfigError(f"unsupported storage scheme {scheme}:// (supported: "
                                 f"{', '.join(sorted(OBJECT_SCHEMES))})")
    authority, _, path = rest.partition("/")
    conn_id, at, bucket = authority.rpartition("@")
    if at and not _CONN_ID.fullmatch(conn_id):
        # The only thing allowed before '@' is a connection id: never key:secret in a URL.
        raise StorageConfigError(f"{scheme}://...@{bucket}: the part before '@' must be an "
                                 "Airflow connection id (credentials belong in the connection)")
    if not _BUCKET.fullmatch(bucket):
        raise StorageConfigError(f"invalid bucket name {bucket!r} in {scheme}://{bucket}/")
    prefix = check_rel_path(path.strip("/"), allow_empty=True)
    return ObjectLocation(scheme, bucket, prefix, conn_id or None)


def check_rel_path(rel_path: str, *, allow_empty: bool = False) -> str:
    """A relative POSIX path with no ``..``, ``.`` or empty parts (keys are not taken blindly)."""
    if rel_path == "" and allow_empty:
        return ""
    parts = rel_path.split("/")
    if rel_path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in rel_path \
            or "\0" in rel_path:
        raise StorageConfigError(f"not a plain relative path: {rel_path!r}")
    return posixpath.normpath(rel_path)


def location_text(location: Path | ObjectLocation) -> str:
    """A location as settings and XCom carry it: the path, or the URL with its connection id."""
    return location.spec if isinstance(location, ObjectLocation) else str(location)


def shown(text: str | Path) -> str:
    """A location as messages show it: the path, or the URL without its connection id."""
    return str(parse_location(text))


def parse_location(text: str | Path) -> Path | ObjectLocation:
    """A local absolute path (returned as given) or an object-storage URL."""
    if isinstance(text, Path):
        return text
    return parse_object_url(text) if is_url(text) else Path(text)
