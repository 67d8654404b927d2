"""Thumbnails and regions of a recorded image file, as HTTP answers (engine: image_etl.thumbnails)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from fastapi import HTTPException

T = TypeVar("T")


def thumbnail(found: Any) -> tuple[bytes, bool]:
    """(JPEG, from the cache?) for a browse.ImageFile; its file is opened confined first, so
    the cache never answers for a file that is no longer the one recorded."""
    from image_etl import thumbnails as t

    if _in_object_storage(found):
        data = _recorded_object(found)
        # Keyed by the object's size and checksum: a replaced object is a new entry. The
        # cache is this api-server's local disk (IMAGE_ETL_THUMBNAIL_CACHE_DIR), never the
        # bucket: the page needs no write access to the output prefix.
        version = t.ContentVersion(len(data), zlib.crc32(data))
        return t.cached_thumbnail(_local_cache_root(), found.image_id, version,
                                  lambda: t.thumbnail(data))
    with _recorded_file(found) as source:
        return t.cached_thumbnail(found.output_dir, found.image_id, source.stat,
                                  lambda: t.thumbnail(source.read()))


def region(found: Any, x: int, y: int, w: int, h: int) -> tuple[bytes, tuple[int, int, int, int]]:
    from image_etl import thumbnails as t

    if _in_object_storage(found):
        return _http(found, lambda: t.region(_recorded_object(found), x, y, w, h))
    with _recorded_file(found) as source:
        return t.region(source.read(), x, y, w, h)


@contextlib.contextmanager
def _recorded_file(found: Any) -> Iterator[Any]:
    """The image's file as its row records it, confined to its drop folder; what goes wrong
    with it, opening or decoding, is an HTTP error naming the image."""
    from image_etl import thumbnails as t

    try:
        with t.open_confined(found.drop_dir, found.rel_path) as source:
            yield source
    except t.ImageFileError as exc:
        raise HTTPException(exc.status, f"image {found.image_id}: {exc.reason}") from None


# --- images in object storage -----------------------------------------------------------------

def _in_object_storage(found: Any) -> bool:
    from image_etl.storage import is_url

    return isinstance(found.drop_dir, str) and is_url(found.drop_dir)


def _recorded_object(found: Any) -> bytes:
    """The object the row records (``<drop_dir>/<rel_path>``, both from the DB, the relative
    path checked: no ``..``), read through the connection named in the recorded URL (else
    IMAGE_ETL_STORAGE_CONN_ID); failures are HTTP errors naming the object, never a secret."""
    from image_etl_airflow.storage import open_storage_for

    from image_etl import thumbnails as t
    from image_etl.storage import StorageError, StorageNotFoundError

    def read() -> bytes:
        t.relative_parts(found.rel_path)
        try:
            data = open_storage_for(found.drop_dir, _api_server_connection).read_bytes(
                found.rel_path)
        except StorageNotFoundError as exc:
            raise t.ImageFileError(404, str(exc)) from None
        except StorageError as exc:  # refused, unreachable, misconfigured: not the image's fault
            raise t.ImageFileError(502, str(exc)) from None
        if len(data) > t.MAX_SOURCE_BYTES:
            raise t.ImageFileError(404, "the image object is larger than "
                                        f"{t.MAX_SOURCE_BYTES >> 20} MB")
        return data

    return _http(found, read)


def _http(found: Any, work: Callable[[], T]) -> T:
    from image_etl import thumbnails as t

    try:
        return work()
    except t.ImageFileError as exc:
        raise HTTPException(exc.status, f"image {found.image_id}: {exc.reason}") from None


def _api_server_connection(conn_id: str) -> Any | None:
    """A connection as the api-server reads it (its secrets backends, env, metadata DB)."""
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection

    try:
        return Connection.get_connection_from_secrets(conn_id)
    except AirflowNotFoundException:
        return None


def _local_cache_root() -> str:
    root = os.environ.get("IMAGE_ETL_THUMBNAIL_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), "image_etl_thumbnails")
    os.makedirs(root, exist_ok=True)
    return os.path.abspath(root)
