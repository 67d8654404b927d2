"""Local folders and object storage (``s3://[conn_id@]bucket/prefix``) behind one small seam.

The stages call :func:`open_storage` with a location (a path or a URL) and, for a URL, the
options the DAG layer derived from the Airflow connection (see ``include/image_etl_airflow/storage.py``);
the engine never reads Airflow connections. Everything else is relative paths under that root:

    store = open_storage("s3://night-drops/2026-11-20", {"key": ..., "secret": ...,
                                                        "endpoint_url": ..., "region_name": ...})
    walk = store.walk(IMAGE_EXTENSIONS)                 # Entry(rel_path, size, mtime) ...
    for entry, data in read_ahead(store.read_bytes, [e.rel_path for e in walk.files]): ...
    store.write_atomic("labels/a.txt", text)            # temp+rename locally, one PUT on S3
    store.exists("_READY"); store.remove_tree("run-1")
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from image_etl.storage.base import Entry, Storage, Walk
from image_etl.storage.errors import (
    BucketNotFoundError,
    StorageAccessError,
    StorageConfigError,
    StorageError,
    StorageNotFoundError,
)
from image_etl.storage.local import LocalStorage
from image_etl.storage.location import (
    ObjectLocation,
    check_rel_path,
    is_url,
    location_text,
    parse_location,
    parse_object_url,
    shown,
)
from image_etl.storage.readahead import read_ahead

__all__ = ["BucketNotFoundError", "Entry", "LocalStorage", "ObjectLocation", "Storage",
           "StorageAccessError", "StorageConfigError", "StorageError", "StorageNotFoundError",
           "Walk", "check_rel_path", "is_url", "location_text", "open_storage", "parse_location",
           "parse_object_url", "read_ahead", "shown"]


def open_storage(location: str | Path | ObjectLocation,
                 options: Mapping[str, Any] | None = None) -> Storage:
    """The storage rooted at ``location``: a local path, or an object URL reached with
    ``options`` (``key``, ``secret``, ``token``, ``endpoint_url``, ``region_name``; none:
    boto's default credential chain). Options for a local path are an error (a mix-up)."""
    where = parse_location(location) if not isinstance(location, ObjectLocation) else location
    if isinstance(where, Path):
        if options:
            raise StorageConfigError(f"storage options given for a local path: {where}")
        return LocalStorage(where)
    from image_etl.storage.s3 import S3Storage  # s3fs only when a URL asks for it

    return S3Storage(where, options)
