"""The pipeline's stages as plain functions: small dicts in and out (XCom-sized), files between.

    discover(params) → manifest file       partition(discovered) → shard files, one per device
    infer(shard)     → staged rows + txt    load(results)         → rows in the results DB

The Airflow DAG calls these one per task; ``python -m image_etl run`` calls them in a row.
Everything bulky (manifests, shard lists, staged rows) lives in files under the run folder
``<output_dir>/_runs/<run id>/``; XCom carries paths and counts only. Every stage can be
re-run: it rewrites its own files, and the load replaces rows instead of adding them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from image_etl.outputs import atomic_write
from image_etl.settings import RunSettings, SettingsError

log = logging.getLogger(__name__)


class TooManyFailedError(RuntimeError):
    """More of the drop's images failed than ``max_failed_fraction`` allows (not transient)."""


def safe_name(text: str) -> str:
    """A run id as a folder name (run ids contain ':' and '+')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "run"


def run_dir_for(settings: RunSettings, run_id: str) -> Path:
    return settings.output_dir / "_runs" / safe_name(run_id)


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, ensure_ascii=False, indent=1))


def discover(params: Mapping[str, Any], *, run_id: str, run_date: dt.date,
             db_url: str | None, allowed_roots: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Validate the params, list the drop, skip what is loaded already, write the manifest."""
    from image_etl.devices import parse_devices
    from image_etl.discover import list_images
    from image_etl.model import check_weights_file, weights_sha256

    settings = RunSettings.from_params(params, run_date, allowed_roots)
    parse_devices(settings.devices, available_gpus=_fleet_gpus())  # refuse bad devices now
    if not settings.drop_dir.is_dir():
        raise SettingsError("drop_dir", f"no such folder: {settings.drop_dir}")
    # Corrupt, truncated or placeholder weights fail here, once, not in every infer task.
    check_weights_file(settings.model_path)
    sha = weights_sha256(settings.model_path)
    listing = list_images(settings.drop_dir, settle_s=settings.settle_seconds)
    already: set[str] = set()
    if not settings.reprocess and db_url:
        from image_etl import store

        engine = store.engine_from_url(db_url)
        try:
            store.migrate(engine)
            already = store.loaded_rel_paths(engine, sha, settings.drop_date)
        finally:
            engine.dispose()
    todo = [f for f in listing.images if f.rel_path not in already]
    run_dir = run_dir_for(settings, run_id)
    manifest = run_dir / "manifest.json"
    _write_json(manifest, {"drop_dir": str(settings.drop_dir), "model_sha256": sha,
                           "images": [[f.rel_path, f.bytes] for f in todo]})
    result = {"run_id": run_id, "date": settings.drop_date.isoformat(),
              "settings": settings.to_dict(), "model_sha256": sha, "run_dir": str(run_dir),
              "manifest": str(manifest), "images": len(todo), "bytes": sum(f.bytes for f in todo),
              "already_loaded": len(listing.images) - len(todo),
              "unsettled": len(listing.unsettled), "skipped_links": len(listing.skipped_links)}
    log.info("discovered %d image(s) to process in %s (%d already loaded for this model, %d "
             "still being written)", len(todo), settings.drop_dir, result["already_loaded"],
             result["unsettled"])
    return result


def _fleet_gpus() -> int:
    """GPUs the workers have: IMAGE_ETL_GPUS when set (scheduler hosts often have none)."""
    from image_etl.devices import cuda_device_count

    value = os.environ.get("IMAGE_ETL_GPUS")
    return int(value) if value else cuda_device_count()


def partition(discovered: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Byte-balanced shards, one per device (never more than images); one file each."""
    from image_etl.devices import shard_devices
    from image_etl.partition import balance

    settings = RunSettings.from_params(discovered["settings"], dt.date.fromisoformat(discovered["date"]))
    manifest = json.loads(Path(discovered["manifest"]).read_text())
    images = manifest["images"]
    devices = shard_devices(settings.devices, available_gpus=_fleet_gpus())
    run_dir = Path(discovered["run_dir"])
    groups = balance(images, [size for _, size in images], len(devices))
    shards = []
    for k, (device, group) in enumerate(zip(devices, groups)):
        shard_file = run_dir / f"shard-{k:03d}.json"
        _write_json(shard_file, {"drop_dir": manifest["drop_dir"], "images": group})
        shards.append({"index": k, "device": device, "images": len(group),
                       "bytes": sum(size for _, size in group), "shard_file": str(shard_file),
                       "run_dir": str(run_dir), "date": discovered["date"],
                       "settings": discovered["settings"],
                       "model_sha256": discovered["model_sha256"]})
    log.info("%d image(s) in %d shard(s): %s", len(images), len(shards),
             ", ".join(f"{s['device']}={s['images']}" for s in shards) or "nothing to do")
    return shards


def infer(shard: Mapping[str, Any]) -> dict[str, Any]:
    """One shard on one (leased) device. Resumes what an earlier attempt finished."""
    from image_etl.devices import check_local_device, lease
    from image_etl.model import ModelLoadError, load_model
    from image_etl.outputs import OutputLayout
    from image_etl.worker import ImageTask, run_shard

    settings = RunSettings.from_params(shard["settings"], dt.date.fromisoformat(shard["date"]))
    data = json.loads(Path(shard["shard_file"]).read_text())
    drop_dir = Path(data["drop_dir"])
    tasks = [ImageTask(drop_dir / rel, rel) for rel, _ in data["images"]]
    run_dir = Path(shard["run_dir"])
    staging = run_dir / f"shard-{shard['index']:03d}.staged.jsonl"
    check_local_device(shard["device"])  # a worker without that GPU fails now, naming it
    with lease(shard["device"]) as device:
        model = load_model(settings.model_path, device, half=settings.infer.half,
                           imgsz=settings.infer.imgsz, runtime=settings.infer.runtime)
        expected = shard.get("model_sha256")
        if expected and model.sha256 != expected:
            # Rows are keyed by the weights' sha256: results of other weights under this run
            # would be loaded under one model and reported (and skipped next time) under another.
            raise ModelLoadError(f"model weights {settings.model_path} changed since discover "
                                 f"(sha256 {expected[:12]}… then, {model.sha256[:12]}… now): "
                                 "re-run the whole DAG run, from discover")
        report = run_shard(tasks, model, settings.infer, OutputLayout(settings.output_dir),
                           staging_path=staging)
    summary = report.to_dict()
    _write_json(run_dir / f"shard-{shard['index']:03d}.report.json", summary)
    return {"index": shard["index"], "device": report.device, "staging": str(staging),
            "images": report.images, "processed": report.processed, "resumed": report.resumed,
            "ok": report.ok, "failed": report.failed, "detections": report.detections,
            "seconds": round(report.wall_s, 3), "images_per_s": round(report.images_per_s, 3)}


def load(discovered: Mapping[str, Any], results: Iterable[Mapping[str, Any] | None], *,
         db_url: str, dag_id: str) -> dict[str, Any]:
    """Every shard's staged rows into the results DB, in one transaction, replacing old rows."""
    from image_etl import store
    from image_etl.outputs import read_staging_header

    settings = RunSettings.from_params(discovered["settings"], dt.date.fromisoformat(discovered["date"]))
    results = [r for r in results if r]
    staging = [Path(r["staging"]) for r in results if Path(r["staging"]).exists()]
    # Class names travel in the staging header: the load needs no model (nor torch) at all.
    header = read_staging_header(staging[0]) if staging else None
    names = {int(k): v for k, v in header["names"].items()} if header and "names" in header else None
    engine = store.engine_from_url(db_url)
    try:
        store.migrate(engine)
        run = store.RunInfo(run_key=f"{dag_id}/{discovered['run_id']}", dag_id=dag_id,
                            run_id=discovered["run_id"], drop_date=settings.drop_date,
                            settings=discovered["settings"],
                            infer_seconds=max((r["seconds"] for r in results), default=0.0))
        t0 = time.perf_counter()
        if staging:
            report = store.load_staged(engine, staging, run, names=names)
            loaded = {"images": report.images, "ok": report.ok, "failed": report.failed,
                      "detections": report.detections}
        else:
            store.upsert_model(engine, discovered["model_sha256"], str(settings.model_path), names)
            store.record_empty_run(engine, run, discovered["model_sha256"])
            loaded = {"images": 0, "ok": 0, "failed": 0, "detections": 0}
    finally:
        engine.dispose()
    loaded["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("loaded %d image(s) (%d failed), %d detection(s) for %s in %.1fs", loaded["images"],
             loaded["failed"], loaded["detections"], settings.drop_date, loaded["seconds"])
    return loaded


def report(discovered: Mapping[str, Any], loaded: Mapping[str, Any], *, db_url: str) -> dict[str, Any]:
    """What the run did, read back from the DB; fails the run if too many images failed."""
    from image_etl import store

    settings = RunSettings.from_params(discovered["settings"], dt.date.fromisoformat(discovered["date"]))
    engine = store.engine_from_url(db_url)
    try:
        summary = store.drop_summary(engine, settings.drop_date, discovered["model_sha256"])
    finally:
        engine.dispose()
    log.info("drop %s, model %s…: %s", settings.drop_date, discovered["model_sha256"][:12],
             json.dumps(summary, ensure_ascii=False))
    if loaded["images"] == 0:
        log.info("0 images to process in this run (drop %s)", settings.drop_date)
    # Judged on the whole drop, not on this run alone: a re-run retries only the failed images
    # (plus late arrivals) and must not turn a healthy drop red because of them.
    if summary["images"] and summary["failed"] / summary["images"] > settings.max_failed_fraction:
        raise TooManyFailedError(f"{summary['failed']} of {summary['images']} images of drop "
                           f"{settings.drop_date} failed, more than max_failed_fraction="
                           f"{settings.max_failed_fraction}; their reasons are in the images "
                           f"table (status='failed')")
    return summary
