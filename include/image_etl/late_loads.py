"""Loading earlier nights' late files into their own nights (the look-back's load side)."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def split_late(discovered: Mapping[str, Any], results: Iterable[Mapping[str, Any] | None]
                ) -> tuple[list[Mapping[str, Any] | None], list[Mapping[str, Any]]]:
    """The shards of the run's own night, and those of earlier nights' late files."""
    own: list[Mapping[str, Any] | None] = []
    late: list[Mapping[str, Any]] = []
    for r in results:
        if r and r.get("date", discovered["date"]) != discovered["date"]:
            late.append(r)
        else:
            own.append(r)
    return own, late


def identity_of(discovered: Mapping[str, Any]) -> dict[str, Any]:
    return {"result_key": discovered.get("result_key"),
            "result_settings": discovered.get("result_settings")}


def load_late(engine: Any, manifest: Mapping[str, Any], discovered: Mapping[str, Any],
              by_night: Mapping[str, list[Path]], run: Any) -> dict[str, dict[str, int]]:
    """Each earlier night's late files into that night (its date and folders, marked caught
    up), one transaction per night; this run's own ``runs`` row stays its night's."""
    from image_etl import store
    from image_etl.staging import read_staging_header

    settings_of = {night["date"]: night["settings"] for night in manifest.get("late", [])}
    caught_up = {}
    for day, staging in sorted(by_night.items()):
        if not staging:
            continue
        header = read_staging_header(staging[0])
        names = ({int(k): v for k, v in header["names"].items()}
                 if header and "names" in header else None)
        night = store.RunInfo(run_key=run.run_key, dag_id=run.dag_id, run_id=run.run_id,
                              drop_date=dt.date.fromisoformat(day), settings=settings_of[day],
                              caught_up=True, **identity_of(discovered))
        report = store.load_staged(engine, staging, night, names=names)
        caught_up[day] = {"images": report.images, "ok": report.ok, "failed": report.failed}
        log.info("caught up %d late image(s) of night %s (%d failed)", report.images, day,
                 report.failed)
    return caught_up


def record_files(engine: Any, manifest: Mapping[str, Any], discovered: Mapping[str, Any],
                 run_key: str) -> None:
    """Every night this run listed: its files as listed (the report's accounting)."""
    from image_etl import store

    for day, files in manifest.get("files", {}).items():
        store.record_night_files(engine, discovered["model_sha256"], dt.date.fromisoformat(day),
                                 run_key, files)
