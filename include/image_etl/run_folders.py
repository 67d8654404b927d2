"""Old run folders: each drop date keeps its newest few (the rows are in the DB already)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

KEEP_RUNS_PER_DATE = int(os.environ.get("IMAGE_ETL_KEEP_RUNS_PER_DATE", "3"))
KEEP_RUNS_GRACE_S = 24 * 3600.0  # a run folder touched this recently may still be needed


def prune_run_dirs(current: Path, keep_per_date: int = KEEP_RUNS_PER_DATE,
                   grace_s: float = KEEP_RUNS_GRACE_S, now: float | None = None) -> list[Path]:
    """Delete the run folders beside ``current`` beyond the ``keep_per_date`` newest of their
    drop date; return them.

    Never deleted: ``current``, and any folder touched in the last ``grace_s`` (a run still
    going, or one whose failed task may still be retried). The load has the rows; what goes
    is each old run's manifest, shard lists, staging files and reports.
    """
    now = time.time() if now is None else now
    by_date: dict[str | None, list[tuple[float, Path]]] = {}
    for folder in current.parent.iterdir():
        manifest = folder / "manifest.json"
        if folder == current or not folder.is_dir() or folder.is_symlink():
            continue
        try:
            touched = max(p.stat().st_mtime for p in (folder, *folder.iterdir()))
            date = json.loads(manifest.read_text()).get("date") if manifest.is_file() else None
        except (OSError, ValueError) as exc:
            log.warning("run folder %s left alone: %s", folder, exc)
            continue
        by_date.setdefault(date, []).append((touched, folder))
    current_date = _manifest_date(current)
    pruned = []
    for date, folders in by_date.items():
        keep = keep_per_date - (date == current_date)  # the current run counts for its date
        for touched, folder in sorted(folders, reverse=True)[max(keep, 0):]:
            if now - touched < grace_s:
                continue
            try:
                shutil.rmtree(folder)
            except OSError as exc:  # housekeeping: the run's rows are loaded already
                log.warning("old run folder %s not pruned: %s", folder, exc)
                continue
            pruned.append(folder)
    if pruned:
        log.info("pruned %d old run folder(s) under %s (kept the %d newest per drop date): %s",
                 len(pruned), current.parent, keep_per_date, ", ".join(p.name for p in pruned))
    return pruned


def _manifest_date(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "manifest.json").read_text()).get("date")
    except (OSError, ValueError):
        return None
