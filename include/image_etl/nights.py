"""A night's files, accounted for; and the look-back that catches late files up.

A file still being written when its night ran (``settle_seconds``), or copied into the
night's folder after that run, would never be read again: the next nightly run reads the
*next* night's folder. So each run also looks back over the ``catchup_nights`` nights before
its own, and processes the images that have no row of this model yet *as part of their own
night* (their drop date, their folders), with this run's result settings (recorded per row).

Cheap by construction: only nights that already ran are looked at (one primary-key probe for
all of them), each is listed once (its own folder, never months of history) and compared
with its loaded rows (one index probe per night). A night that never ran is a backfill's
job, not the look-back's: its own run (or a backfill) lists and loads it whole.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from image_etl.discover import FoundImage, Listing, list_images
from image_etl.run_settings import RunSettings

log = logging.getLogger(__name__)

UNSETTLED_NAMES = 10  # how many names of still-unsettled files a report keeps


@dataclasses.dataclass
class Night:
    """One night as a run saw it: its settings (folders) and files, and what is left to do."""

    settings: RunSettings
    listing: Listing
    todo: list[FoundImage]
    other_settings: int = 0  # loaded ok, but with other result settings: processed again

    def files(self) -> dict[str, Any]:
        """The night's file accounting (``night_files``), JSON-ready."""
        listing = self.listing
        return {"listed": len(listing.images), "unsettled": len(listing.unsettled),
                "unsettled_names": listing.unsettled[:UNSETTLED_NAMES],
                "skipped_links": len(listing.skipped_links),
                "skipped_unknown": listing.skipped_unknown,
                "skipped_hidden": listing.skipped_hidden}


def to_do(listing: Listing, rows: Mapping[str, tuple[str, str | None]], result_key: str,
          reprocess: bool = False) -> tuple[list[FoundImage], int]:
    """A run's own night: the listed images not loaded ok with ``result_key`` (failed ones are
    tried again; all with ``reprocess``), and how many of them were loaded with other settings.

    A row without a recorded key (loaded before revision 0003) counts as loaded: an upgrade
    must not quietly re-run every recent night; ``reprocess`` redoes them.
    """
    if reprocess:
        return list(listing.images), 0
    todo = [f for f in listing.images
            if rows.get(f.rel_path, ("", ""))[0] != "ok"
            or rows[f.rel_path][1] not in (None, result_key)]
    other = sum(f.rel_path in rows and rows[f.rel_path][0] == "ok" for f in todo)
    return todo, other


def late(listing: Listing, rows: Mapping[str, tuple[str, str | None]]) -> list[FoundImage]:
    """An earlier night's late files: listed images without any row of this model.

    Not those loaded with other result settings (the look-back would otherwise re-run N
    nights whenever a setting changes: re-running a night with new settings is its own run's
    or a backfill's job), nor failed ones (an outcome already; a re-run of the night retries
    them).
    """
    return [f for f in listing.images if f.rel_path not in rows]


def look_back_dates(drop_date: dt.date, nights: int) -> list[dt.date]:
    """The ``nights`` nights before ``drop_date``, nearest first."""
    return [drop_date - dt.timedelta(days=k) for k in range(1, nights + 1)]


def look_back(params: Mapping[str, Any], settings: RunSettings, *, run_date: dt.date,
              allowed_roots: tuple[Any, ...], sha: str, engine: Any,
              open_storage: Callable[[str], Any] | None = None) -> list[Night]:
    """The earlier nights (``settings.catchup_nights``) that ran, each listed again: their
    late images (see ``late``) and their files as they are now, nearest first."""
    from image_etl import store

    if settings.catchup_nights <= 0:
        return []
    dates = look_back_dates(settings.drop_date, settings.catchup_nights)
    ran = store.nights_that_ran(engine, sha, dates)
    found = []
    for day in dates:
        if day not in ran:
            continue
        night = RunSettings.from_params({**params, "date": day.isoformat(), "reprocess": False},
                                        run_date, allowed_roots, model_sha256=sha,
                                        check_files=False)
        if night.drop_dir == settings.drop_dir:
            # No {date} in drop_dir: every night is the same folder, which this run lists
            # already; loading its files again under earlier dates would duplicate them.
            log.info("look-back off: drop_dir %s is the same folder for every night (no {date})",
                     settings.drop_dir)
            return []
        drop = night.drop_dir
        if isinstance(drop, Path) and not drop.is_dir():
            log.warning("look-back: the folder of night %s is gone: %s", day, drop)
            continue
        from image_etl.run_files import default_opener, storage_at

        # A prefix with no objects left lists empty.
        listing = list_images(drop if isinstance(drop, Path)
                              else storage_at(drop, open_storage or default_opener),
                              settle_s=settings.settle_seconds)
        todo = late(listing, store.image_rows(engine, sha, day))
        found.append(Night(night, listing, todo))
        if todo:
            log.info("look-back: night %s has %d image(s) not loaded yet (late files), e.g. %s: "
                     "processing them into that night", day, len(todo), todo[0].rel_path)
    return found


def own_and_late_nights(params: Mapping[str, Any], settings: RunSettings, listing: Any,
                         key: str, *, run_date: dt.date, allowed_roots: tuple[Any, ...],
                         sha: str, db_url: str | None, open_storage: Callable[[str], Any]
                         ) -> tuple[Any, list[Any]]:
    """The run's own night (what is left to do under this result identity) and the earlier
    nights the look-back listed again (image_etl.nights)."""
    if not db_url:  # no results DB (engine tests): everything listed is to do
        return Night(settings, listing, list(listing.images)), []
    from image_etl import store

    engine = store.engine_from_url(db_url)
    try:
        store.migrate(engine)
        rows = {} if settings.reprocess else store.image_rows(engine, sha, settings.drop_date)
        todo, other = to_do(listing, rows, key, settings.reprocess)
        late = look_back(params, settings, run_date=run_date, allowed_roots=allowed_roots,
                                sha=sha, engine=engine, open_storage=open_storage)
    finally:
        engine.dispose()
    return Night(settings, listing, todo, other), late


def late_manifest(own: Any, late: list[Any]) -> dict[str, Any]:
    """The manifest's part about files: every listed night's accounting, and the late images
    of earlier nights with their night's resolved settings (folders)."""
    return {"files": {n.settings.drop_date.isoformat(): n.files() for n in (own, *late)},
            "late": [{"date": n.settings.drop_date.isoformat(), "settings": n.settings.to_dict(),
                      "images": [[f.rel_path, f.bytes] for f in n.todo]} for n in late if n.todo]}
