"""A night is loaded whole or not at all: every image discover listed has exactly one outcome.

``load`` asks :func:`staging_by_night` which staging files to load. It compares the images of
the run's manifest (what discover listed: the run's night, and earlier nights' late files) with
the outcomes (``ok`` or ``failed``) the shards staged, night by night. A shard whose ``infer``
left no result (marked success or skipped by hand in the UI before it ran, an XCom lost) is
loaded from what it wrote if it staged every one of its images; otherwise the load is
refused, naming the shard and its images, and nothing is committed. Plain Python; the
staging format is read through ``staging``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from image_etl.errors import IncompleteNightError
from image_etl.staging import read_staging

__all__ = ["staging_by_night", "staging_path", "ShardGap", "IncompleteNightError"]

OUTCOMES = ("ok", "failed")
NAMES_SHOWN = 10  # image names an error lists per shard; the count says how many more


def staging_path(run_dir: Path, index: int) -> Path:
    """Where shard ``index`` of a run stages its rows (infer writes it, load reads it)."""
    return run_dir / f"shard-{index:03d}.staged.jsonl"


@dataclasses.dataclass(frozen=True)
class ShardGap:
    """Images of one shard without an outcome; ``why`` says what the load found."""

    index: int
    missing: tuple[str, ...]
    why: str

    def describe(self) -> str:
        shown = ", ".join(self.missing[:NAMES_SHOWN])
        more = len(self.missing) - NAMES_SHOWN
        return (f"shard {self.index} (infer map index {self.index}; {self.why}): "
                f"{len(self.missing)} image(s) without an outcome: {shown}"
                + (f" and {more} more" if more > 0 else ""))


def _names(entries: Iterable[Any]) -> list[str]:
    """rel_paths of a manifest's or shard file's ``images`` ([rel_path, bytes, ...] each)."""
    return [e[0] if isinstance(e, (list, tuple)) else str(e) for e in entries]


def _outcomes(path: Path) -> dict[str, str]:
    _, records = read_staging(path)  # the latest record of an image wins (a retried failure)
    return {r["rel_path"]: str(r.get("status")) for r in records}


def staging_by_night(manifest: Path, plan: list[Mapping[str, Any]] | None,
                     results: list[Mapping[str, Any]]) -> dict[str | None, list[Path]]:
    """The staging files of each night the run listed (its own, and earlier nights' late
    files), each night whole; or IncompleteNightError naming every shard and image that is not.

    ``plan``: partition's shards (index, shard_file, run_dir, date); None when the caller has
    no plan (then only the shards that returned a result are looked at). ``results``: what the
    ``infer`` tasks returned (index, staging, date); a shard may be absent.
    """
    data = json.loads(manifest.read_text())
    own = data.get("date")
    listed = {own: _names(data["images"])}
    for night in data.get("late", []):
        listed[night["date"]] = _names(night["images"])
    files: dict[str | None, list[Path]] = {}
    problems: list[str] = []
    for night, names in listed.items():
        mine = [r for r in results if r.get("date", own) == night]
        shards = (None if plan is None else
                  [s for s in plan if s.get("date", own) == night])
        files[night], found = _night(names, shards, mine)
        if found:
            problems.append((f"night {night}: " if len(listed) > 1 else "") + "; ".join(found))
    if problems:
        total = sum(len(n) for n in listed.values())
        raise IncompleteNightError(
            f"load refused, nothing was committed: {total} image(s) listed by discover "
            f"(manifest {manifest}), but " + "; ".join(problems)
            + ". Clear the infer task(s) named (or the whole run) to process them.")
    return files


def _night(listed: list[str], plan: list[Mapping[str, Any]] | None,
           results: list[Mapping[str, Any]]) -> tuple[list[Path], list[str]]:
    """One night's staging files, and what keeps it from being whole (empty: nothing)."""
    by_index = {int(r["index"]): r for r in results}
    files: list[Path] = []
    gaps: list[ShardGap] = []
    seen: dict[str, int] = {}
    problems: list[str] = []
    shards: list[Mapping[str, Any]] = (plan if plan is not None
                                       else [{"index": i} for i in sorted(by_index)])
    for shard in shards:
        index = int(shard["index"])
        result = by_index.get(index)
        path = Path(result["staging"]) if result else staging_path(Path(shard["run_dir"]), index)
        expected = (_names(json.loads(Path(shard["shard_file"]).read_text())["images"])
                    if "shard_file" in shard else None)
        if not path.is_file():
            # A shard with a result but no file is the storage problem the load names itself.
            if result is None:
                gaps.append(ShardGap(index, tuple(expected or ()), "its infer task left no "
                                     "result and no staging file: it never ran (marked success "
                                     "or skipped by hand?)"))
            continue
        outcomes = _outcomes(path)
        if expected is not None:
            absent = tuple(n for n in expected if n not in outcomes)
            if absent:
                why = ("its infer task left no result and did not finish" if result is None
                       else f"its staging file {path} lacks them")
                gaps.append(ShardGap(index, absent, why))
                continue
        for name, status in outcomes.items():
            if status not in OUTCOMES:
                problems.append(f"{name!r} has outcome {status!r} in {path}")
            if name in seen:
                problems.append(f"{name!r} has an outcome from shard {seen[name]} and shard {index}")
            seen[name] = index
        files.append(path)
    if not gaps:  # every planned shard is whole: what is still missing was in no shard
        unplanned = [n for n in listed if n not in seen]
        if unplanned:
            problems.append(f"{len(unplanned)} listed image(s) in no shard's staged rows: "
                            + ", ".join(unplanned[:NAMES_SHOWN]))
    extra = [n for n in seen if n not in set(listed)]
    if extra:
        problems.append(f"{len(extra)} staged image(s) discover did not list: "
                        + ", ".join(extra[:NAMES_SHOWN]))
    return files, [g.describe() for g in gaps] + problems
