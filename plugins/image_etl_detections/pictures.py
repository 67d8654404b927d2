"""Thumbnails and regions of a recorded image file, as HTTP answers (engine: image_etl.thumbnails)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from fastapi import HTTPException


def thumbnail(found: Any) -> tuple[bytes, bool]:
    """(JPEG, from the cache?) for a browse.ImageFile; its file is opened confined first, so
    the cache never answers for a file that is no longer the one recorded."""
    from image_etl import thumbnails as t

    with _recorded_file(found) as source:
        return t.cached_thumbnail(found.output_dir, found.image_id, source.stat,
                                  lambda: t.thumbnail(source.read()))


def region(found: Any, x: int, y: int, w: int, h: int) -> tuple[bytes, tuple[int, int, int, int]]:
    from image_etl import thumbnails as t

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
