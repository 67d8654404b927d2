"""The pipeline's stages as plain functions: small dicts in and out (XCom-sized), files between.

    discover(params) → manifest file       partition(discovered) → shard files, one per device
    infer(shard)     → staged rows + txt    load(results)         → rows in the results DB
    report(...)      → this run's and the drop's counts; old run folders pruned

The Airflow DAG calls these one per task. Everything bulky (manifests, shard lists, staged
rows) lives in files under the run folder ``<output_dir>/_runs/<run id>/``; XCom carries paths
and counts only. Every stage can be re-run: it rewrites its own files, and the load replaces
rows instead of adding them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from image_etl import late_loads, nights, run_files
from image_etl.errors import (
    MissingStagingError,
    SettingsError,
    TooManyFailedError,
    WeightsChangedError,
)
from image_etl.run_files import Opener, default_opener
from image_etl.run_folders import prune_run_dirs
from image_etl.run_settings import RunSettings
from image_etl.storage import location_text

log = logging.getLogger(__name__)

__all__ = ["discover", "partition", "infer", "load", "report", "shard_label", "infer_time_limit_s",
           "prune_run_dirs", "TooManyFailedError"]

MODEL_LOAD_BUDGET_S = 900.0  # infer's time limit before its first image (lease wait, load)


def safe_name(text: str) -> str:
    """A run id as a folder name (run ids contain ':' and '+')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "run"


def run_dir_for(settings: RunSettings, run_id: str) -> str:
    """The run folder: a path, or a URL under an object-storage output folder."""
    return run_files.join(location_text(settings.output_dir), f"_runs/{safe_name(run_id)}")


def _settings(stage_input: Mapping[str, Any]) -> RunSettings:
    """The run's settings as discover resolved them (no template, no file looked at)."""
    return RunSettings.resolved(stage_input["settings"])


# --- discover --------------------------------------------------------------------------------------

def discover(params: Mapping[str, Any], *, run_id: str, run_date: dt.date,
             db_url: str | None, allowed_roots: tuple[Any, ...] = (),
             open_storage: Opener = default_opener) -> dict[str, Any]:
    """Validate the params, list the drop, skip what is loaded already, write the manifest.

    ``open_storage`` opens an object-storage location (the DAG's derives the options from the
    Airflow connection); every stage takes one."""
    from image_etl.devices import parse_devices
    from image_etl.discover import list_images
    from image_etl.weights import check_weights_file, weights_sha256

    settings = RunSettings.from_params(params, run_date, allowed_roots)
    parse_devices(settings.devices)  # refuse bad devices now (GPUs counted without torch)
    if isinstance(settings.drop_dir, Path) and not settings.drop_dir.is_dir():
        raise SettingsError("drop_dir", f"no such folder: {settings.drop_dir}")
    # Corrupt, truncated or placeholder weights fail here, once, not in every infer task.
    check_weights_file(settings.model_path)
    sha = weights_sha256(settings.model_path)
    drop = settings.drop_dir
    listing = list_images(drop if isinstance(drop, Path) else run_files.storage_at(drop, open_storage),
                          settle_s=settings.settle_seconds)
    identity = _result_identity(settings)
    own, late = nights.own_and_late_nights(params, settings, listing, identity["result_key"],
                                     run_date=run_date, allowed_roots=allowed_roots, sha=sha,
                                     db_url=db_url, open_storage=open_storage)
    todo = own.todo
    run_dir = run_dir_for(settings, run_id)
    manifest = run_files.join(run_dir, "manifest.json")
    run_files.write_json(manifest, {"run_id": run_id, "date": settings.drop_date.isoformat(),
                                    "drop_dir": location_text(drop), "model_sha256": sha,
                                    "images": [[f.rel_path, f.bytes] for f in todo],
                                    **nights.late_manifest(own, late)}, open_storage)
    result = {"run_id": run_id, "date": settings.drop_date.isoformat(),
              "settings": settings.to_dict(), "model_sha256": sha, "run_dir": run_dir,
              "manifest": manifest, "images": len(todo), "bytes": sum(f.bytes for f in todo),
              "already_loaded": len(listing.images) - len(todo),
              "unsettled": len(listing.unsettled), "skipped_links": len(listing.skipped_links),
              **identity, "other_settings": own.other_settings, "files": own.files(),
              "late": {n.settings.drop_date.isoformat(): len(n.todo) for n in late if n.todo}}
    log.info("drop %s: %d image(s) to process in %s (%d already loaded for this model and "
             "these result settings, %d still being written)", result["date"], len(todo),
             settings.drop_dir, result["already_loaded"], result["unsettled"])
    _log_identity(result)
    return result


def _result_identity(settings: RunSettings) -> dict[str, Any]:
    from image_etl.identity import result_key, result_settings

    values = result_settings(settings.infer)
    return {"result_key": result_key(values), "result_settings": values}


def _log_identity(found: Mapping[str, Any]) -> None:
    from image_etl.identity import describe

    log.info("result settings %s (key %s)", describe(found["result_settings"]),
             found["result_key"])
    if found["other_settings"]:
        log.warning("%d image(s) of night %s were loaded with other result settings: processing "
                    "them again with these (their rows are replaced, image by image)",
                    found["other_settings"], found["date"])
    if found["late"]:
        log.info("catching up %d late image(s) of earlier nights into their own nights: %s",
                 sum(found["late"].values()), json.dumps(found["late"]))


# --- partition ------------------------------------------------------------------------------------

def partition(discovered: Mapping[str, Any], *, open_storage: Opener = default_opener
              ) -> list[dict[str, Any]]:
    """Byte-balanced shards, one per device (never more than images); one file each."""
    from image_etl.devices import shard_devices
    from image_etl.partition import balance

    settings = _settings(discovered)
    manifest = run_files.read_json(discovered["manifest"], open_storage)
    images = manifest["images"]
    devices = shard_devices(settings.devices)
    run_dir = discovered["run_dir"]
    groups = balance(images, [size for _, size in images], len(devices))
    shards = []
    for k, (device, group) in enumerate(zip(devices, groups)):
        shard_file = run_files.join(run_dir, f"shard-{k:03d}.json")
        run_files.write_json(shard_file, {"drop_dir": manifest["drop_dir"], "images": group},
                             open_storage)
        shards.append({"index": k, "shards": len(groups), "device": device, "images": len(group),
                       "bytes": sum(size for _, size in group), "shard_file": shard_file,
                       "run_dir": run_dir, "date": discovered["date"],
                       "settings": discovered["settings"],
                       "model_sha256": discovered["model_sha256"]})
    shards += _late_shards(discovered, manifest.get("late", []), devices, run_dir, len(shards),
                           open_storage)
    for shard in shards:
        shard["shards"] = len(shards)
    log.info("%d image(s) in %d shard(s): %s", len(images), len(shards),
             ", ".join(f"{s['device']}={s['images']}" for s in shards) or "nothing to do")
    return shards


def _late_shards(discovered: Mapping[str, Any], late: list[Mapping[str, Any]], devices: list[str],
                 run_dir: str, first: int, open_storage: Opener) -> list[dict[str, Any]]:
    """Shards of earlier nights' late images: their own (a shard is one night: one drop
    folder, one output folder, one staging file loaded into that night), byte-balanced."""
    from image_etl.partition import balance

    shards: list[dict[str, Any]] = []
    for night in late:
        images = night["images"]
        for device, group in zip(devices, balance(images, [size for _, size in images],
                                                  len(devices))):
            k = first + len(shards)
            shard_file = run_files.join(run_dir, f"shard-{k:03d}.json")
            run_files.write_json(shard_file, {"drop_dir": night["settings"]["drop_dir"],
                                              "images": group}, open_storage)
            shards.append({"index": k, "device": device, "images": len(group),
                           "bytes": sum(size for _, size in group), "shard_file": shard_file,
                           "run_dir": run_dir, "date": night["date"], "late": True,
                           "settings": night["settings"],
                           "model_sha256": discovered["model_sha256"]})
    return shards


def shard_label(shard: Mapping[str, Any], device: str | None = None) -> str:
    """What the UI shows for a mapped infer task: ``shard 1/2 · cuda:0 · 3 images`` (and
    ``· late, night 2026-11-19`` for a shard of an earlier night's late files)."""
    n = shard["images"]
    late = f" · late, night {shard['date']}" if shard.get("late") else ""
    return (f"shard {shard['index'] + 1}/{shard.get('shards', '?')} · {device or shard['device']} · "
            f"{n} image{'' if n == 1 else 's'}{late}")


def infer_time_limit_s(shard: Mapping[str, Any]) -> float:
    """infer's execution_timeout: a model-load budget plus ``timeout_per_image_s`` per image,
    per 8 model inputs of the reference frame (2048 x 12000) in sliced mode (97 at 640 px: x 12)."""
    settings = _settings(shard)
    per_image = settings.timeout_per_image_s
    if settings.infer.sliced:
        from image_etl.sizes import REFERENCE_FRAME_HW, size_hw
        from image_etl.slicing import slice_grid

        slice_hw = size_hw(settings.infer.slice_size)
        assert slice_hw is not None
        inputs = len(slice_grid(*REFERENCE_FRAME_HW, slice_hw, settings.infer.slice_overlap))
        per_image *= max(1.0, (inputs + settings.infer.full_image_pass) / 8)
    return MODEL_LOAD_BUDGET_S + per_image * shard["images"]


# --- infer ------------------------------------------------------------------------------------------

def infer(shard: Mapping[str, Any], *, open_storage: Opener = default_opener) -> dict[str, Any]:
    """One shard on one (leased) device. Resumes what an earlier attempt finished (from the
    staging file, or the staging object it PUT on object storage)."""
    from image_etl.devices import check_local_device, lease
    from image_etl.model import load_model
    from image_etl.output_paths import OutputLayout
    from image_etl.sink import StagingObject
    from image_etl.storage import parse_location
    from image_etl.worker import ImageTask, run_shard

    settings = _settings(shard)
    data = run_files.read_json(shard["shard_file"], open_storage)
    drop = parse_location(data["drop_dir"])
    # A local drop's files are read by the decode threads; a bucket's, by read-ahead (source).
    tasks = [ImageTask(drop / rel if isinstance(drop, Path) else None, rel)
             for rel, _ in data["images"]]
    source = None if isinstance(drop, Path) else run_files.storage_at(drop, open_storage)
    run_dir = shard["run_dir"]
    staging_name = f"shard-{shard['index']:03d}.staged.jsonl"
    staging = run_files.join(run_dir, staging_name)
    staging_target = (Path(staging) if run_files.is_local(staging)
                      else StagingObject(run_files.storage_at(run_dir, open_storage), staging_name))
    output = (OutputLayout(settings.output_dir) if isinstance(settings.output_dir, Path)
              else run_files.storage_at(settings.output_dir, open_storage))
    check_local_device(shard["device"])  # a worker without that GPU fails now, naming it
    # whoever waits for this GPU reads it
    holder = f"run {run_dir.rstrip('/').rsplit('/', 1)[-1]}, {shard_label(shard)}"
    with lease(shard["device"], holder=holder) as device:
        load_started = time.time()
        model = load_model(settings.model_path, device, precision=settings.infer.precision,
                           imgsz=settings.infer.imgsz, runtime=settings.infer.runtime)
        expected = shard.get("model_sha256")
        if expected and model.sha256 != expected:
            # Rows are keyed by the weights' sha256: results of other weights under this run
            # would be loaded under one model and reported (and skipped next time) under another.
            raise WeightsChangedError(
                f"model weights {settings.model_path} changed since discover (sha256 "
                f"{expected[:12]}… then, {model.sha256[:12]}… now): re-run the whole DAG run, "
                "from discover")
        # The run's throughput counts from here: a model load (or a first OpenVINO export)
        # is not inference, and it is reported beside it.
        started = time.time()
        report = run_shard(tasks, model, settings.infer, output, staging_path=staging_target,
                           timeout_per_image_s=settings.timeout_per_image_s, source=source)
    summary = report.to_dict()
    run_files.write_json(run_files.join(run_dir, f"shard-{shard['index']:03d}.report.json"),
                         summary, open_storage)
    return {"index": shard["index"], "date": shard["date"], "device": report.device,
            "host": socket.gethostname(),
            "staging": staging, "images": report.images, "processed": report.processed,
            "resumed": report.resumed, "ok": report.ok, "failed": report.failed,
            "detections": report.detections, "seconds": round(report.wall_s, 3),
            "images_per_s": round(report.images_per_s, 3),
            "model_load_s": round(started - load_started, 3), "started_at": started,
            "ended_at": time.time()}


# --- load -----------------------------------------------------------------------------------------

def load(discovered: Mapping[str, Any], results: Iterable[Mapping[str, Any] | None], *,
         db_url: str, dag_id: str, plan: list[Mapping[str, Any]] | None = None,
         open_storage: Opener = default_opener) -> dict[str, Any]:
    """Every shard's staged rows into the results DB, in one transaction, replacing old rows.

    Fails, naming each file and the host that wrote it, when a shard's staging file is not
    here: loading the rest would commit a partial night that ``report`` could not tell from
    a whole one. Fails too, naming the shard and its images, when an image discover listed
    has no outcome (``plan``: partition's shards, to find the shards that left no result).
    """
    settings = _settings(discovered)
    results = list(results)
    _check_staging_present([r for r in results if r], open_storage)
    if run_files.is_local(discovered["run_dir"]):
        return _load(discovered, settings, results, plan, db_url=db_url, dag_id=dag_id)
    # A run folder in a bucket: its files are copied to a temporary folder first (the
    # completeness check and the loaders read files), then loaded as a local run's are.
    with run_files.local_run(discovered, results, plan, open_storage) as (here, results, plan):
        return _load(here, settings, results, plan, db_url=db_url, dag_id=dag_id)


def _load(discovered: Mapping[str, Any], settings: RunSettings,
          results: list[Mapping[str, Any] | None], plan: list[Mapping[str, Any]] | None, *,
          db_url: str, dag_id: str) -> dict[str, Any]:
    from image_etl import store
    from image_etl.staging import read_staging_header

    staging_of = _whole_nights(discovered, plan, [r for r in results if r])
    staging = staging_of.pop(discovered["date"], [])
    own, _ = late_loads.split_late(discovered, results)  # the late nights' files are in staging_of
    shards: list[Mapping[str, Any]] = [r for r in own if r]
    # Class names travel in the staging header: the load needs no model (nor torch) at all.
    header = read_staging_header(staging[0]) if staging else None
    names = {int(k): v for k, v in header["names"].items()} if header and "names" in header else None
    engine = store.engine_from_url(db_url)
    try:
        store.migrate(engine)
        run = store.RunInfo(run_key=store.run_key(dag_id, discovered["run_id"]), dag_id=dag_id,
                            run_id=discovered["run_id"], drop_date=settings.drop_date,
                            settings=discovered["settings"], infer_seconds=_infer_span_s(shards),
                            **late_loads.identity_of(discovered))
        t0 = time.perf_counter()
        loaded: dict[str, float]
        if staging:
            report = store.load_staged(engine, staging, run, names=names)
            loaded = {"images": report.images, "ok": report.ok, "failed": report.failed,
                      "detections": report.detections}
        else:
            store.upsert_model(engine, discovered["model_sha256"], str(settings.model_path), names)
            store.record_empty_run(engine, run, discovered["model_sha256"])
            loaded = {"images": 0, "ok": 0, "failed": 0, "detections": 0}
        manifest = json.loads(Path(discovered["manifest"]).read_text())  # read once for both
        caught_up = late_loads.load_late(engine, manifest, discovered, staging_of, run)
        late_loads.record_files(engine, manifest, discovered, run.run_key)
    finally:
        engine.dispose()
    loaded["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("loaded %d image(s) (%d failed), %d detection(s) for %s in %.1fs", loaded["images"],
             loaded["failed"], loaded["detections"], settings.drop_date, loaded["seconds"])
    return {**loaded, "caught_up": caught_up}


def _whole_nights(discovered: Mapping[str, Any], plan: list[Mapping[str, Any]] | None,
                  results: list[Mapping[str, Any]]) -> dict[Any, list[Path]]:
    """Per night (the run's own, earlier nights' late files), the staging files holding one
    outcome for every image discover listed; or an error naming what has none."""
    from image_etl.completeness import staging_by_night

    return staging_by_night(Path(discovered["manifest"]), plan, results)


def _check_staging_present(results: list[Mapping[str, Any]], open_storage: Opener) -> None:
    missing = [r for r in results if not run_files.exists(r["staging"], open_storage)]
    if missing:
        detail = "; ".join(f"shard {r['index']}: {r['staging']} (written on host "
                           f"{r.get('host', 'unknown')})" for r in missing)
        raise MissingStagingError(
            f"{len(missing)} of {len(results)} shard staging file(s) missing on host "
            f"{socket.gethostname()}: {detail}. Every worker must write the output folder on "
            "storage that the load task's host reads too (see docs/deploy.md)")


def _infer_span_s(results: list[Mapping[str, Any]]) -> float:
    """The wall time the shards really ran: from the first one's start to the last one's end
    (shards of one run may run one after the other, or side by side)."""
    ran = [r for r in results if r.get("started_at") is not None]
    if not ran:
        return max((r["seconds"] for r in results), default=0.0)
    return max(r["ended_at"] for r in ran) - min(r["started_at"] for r in ran)


# --- report ---------------------------------------------------------------------------------------

def report(discovered: Mapping[str, Any], loaded: Mapping[str, Any], *, db_url: str) -> dict[str, Any]:
    """This run's counts beside the drop's, read back from the DB; fails the run if too many
    of the drop's images failed. Then old run folders of this output folder are pruned."""
    from image_etl import store

    settings = _settings(discovered)
    engine = store.engine_from_url(db_url)
    try:
        drop = store.drop_summary(engine, settings.drop_date, discovered["model_sha256"])
    finally:
        engine.dispose()
    this_run = {k: loaded[k] for k in ("images", "ok", "failed", "detections") if k in loaded}
    log.info("this run loaded %d image(s) (%d ok, %d failed), %d detection(s)%s",
             this_run.get("images", 0), this_run.get("ok", 0), this_run.get("failed", 0),
             this_run.get("detections", 0),
             " (nothing new in the drop)" if not this_run.get("images") else "")
    log.info("drop %s, model %s…, all runs: %s", settings.drop_date, discovered["model_sha256"][:12],
             json.dumps(drop, ensure_ascii=False))
    night = _account_for_night(discovered, loaded, db_url)
    if run_files.is_local(discovered["run_dir"]):  # object storage: its lifecycle rules prune
        prune_run_dirs(Path(discovered["run_dir"]))
    # Judged on the whole drop, not on this run alone: a re-run retries only the failed images
    # (plus late arrivals) and must not turn a healthy drop red because of them.
    if drop["images"] and drop["failed"] / drop["images"] > settings.max_failed_fraction:
        raise TooManyFailedError(f"{drop['failed']} of {drop['images']} images of drop "
                                 f"{settings.drop_date} failed, more than max_failed_fraction="
                                 f"{settings.max_failed_fraction}; their reasons are in the "
                                 "images table (status='failed')")
    return {"date": settings.drop_date.isoformat(), "run": this_run, "drop": drop,
            "night": night, "caught_up": loaded.get("caught_up", {}),
            "reprocessed_for_settings": discovered.get("other_settings", 0)}


def _account_for_night(discovered: Mapping[str, Any], loaded: Mapping[str, Any],
                       db_url: str) -> dict[str, Any]:
    """Every file of the run's night, read back from the DB, logged in one line each."""
    from image_etl import store
    from image_etl.identity import describe

    engine = store.engine_from_url(db_url)
    try:
        with engine.connect() as conn:
            night = store.night_accounting(conn, discovered["model_sha256"],
                                           dt.date.fromisoformat(discovered["date"]))
    finally:
        engine.dispose()
    log.info("night %s: %s image(s) listed, %d loaded ok, %d failed, %d caught up after its "
             "own run; %s still being written%s; skipped: %s link(s), %s file(s) of other "
             "extensions, %s hidden", discovered["date"], night["listed"], night["ok"],
             night["failed"], night["caught_up"], night["unsettled"],
             f" (e.g. {', '.join(night['unsettled_names'][:3])})" if night["unsettled"] else "",
             night["skipped_links"], night["skipped_unknown"], night["skipped_hidden"])
    for day, counts in sorted(loaded.get("caught_up", {}).items()):
        log.info("caught up from night %s: %d late image(s) (%d failed)", day, counts["images"],
                 counts["failed"])
    if discovered.get("other_settings"):
        log.info("processed again for other result settings: %d image(s)",
                 discovered["other_settings"])
    if night["mixed_settings"]:
        log.warning("night %s mixes result settings: %s", discovered["date"], "; ".join(
            f"{s['images']} image(s) with "
            f"{describe(s['settings']) if s['settings'] is not None else 'settings not recorded'}"
            for s in night["settings"]))
    return night
