"""``python -m image_etl ...``: the pipeline's stages without Airflow.

    make-drop DIR --date YYYY-MM-DD --count N     synthetic drop + ground truth
    infer IMAGES_DIR --out OUT --model PATH       one worker over a folder of images
    db upgrade|current|history [--db-url URL]    the results database's schema

Exit status: 0 done; 1 the run could not go on (model, device, output; one line says why);
2 a bad argument, refused before any work; 3 done, but more images failed than
``--max-failed-fraction`` allows (each failed image's reason is in the log and the summary).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from image_etl.settings import SETTINGS, InferSettings, SettingsError, check, env_defaults

if TYPE_CHECKING:
    from image_etl.shard_report import ShardReport

log = logging.getLogger("image_etl")
DEFAULTS = env_defaults()


def _flag_dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting that declares one (settings.SETTINGS): its help, its default from
    the environment. Values stay text here: settings.check validates them, naming them."""
    for name, spec in SETTINGS.items():
        if spec.cli is None:
            continue
        env = f"; env {spec.env}" if spec.env else ""
        bounds = f" ({spec.bounds_text()})" if spec.bounds_text() and not spec.enum else ""
        text = f"{spec.title}{bounds}. {spec.description}".rstrip(". ") + env
        if spec.kind is bool:
            parser.add_argument(spec.cli, dest=_flag_dest(spec.cli), default=DEFAULTS[name],
                                action=argparse.BooleanOptionalAction, help=text)
        else:
            choices = list(spec.enum) or None
            parser.add_argument(spec.cli, dest=_flag_dest(spec.cli), default=DEFAULTS[name],
                                choices=choices, help=text)


def _setting_values(args: argparse.Namespace) -> dict[str, object]:
    return {name: getattr(args, _flag_dest(spec.cli)) for name, spec in SETTINGS.items()
            if spec.cli is not None}


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, got {text!r}") from None


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    if w < 64 or h < 64:
        raise argparse.ArgumentTypeError("width and height must be at least 64")
    return w, h


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m image_etl", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    drop = sub.add_parser("make-drop", help="write a synthetic drop with ground-truth labels")
    drop.add_argument("dir", type=Path)
    drop.add_argument("--date", type=_date, default=dt.date.today())
    drop.add_argument("--count", type=int, default=24)
    drop.add_argument("--size", type=_size, default=(2048, 12000), help="WIDTHxHEIGHT")
    drop.add_argument("--seed", type=int, default=0)
    drop.add_argument("--quality", type=int, default=90, help="JPEG quality")
    drop.add_argument("--defects", choices=("large", "small"), default="large",
                      help="large: 260-560 px (the demo); small: 8-48 px, for sliced inference")

    infer = sub.add_parser("infer", help="run one worker over every image under a folder",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    infer.add_argument("images_dir", help="a folder, or s3://bucket/prefix (credentials and "
                       "endpoint from the AWS_* environment, as boto reads them)")
    infer.add_argument("--out", help="output root (labels/, annotated/): a folder or s3://...")
    infer.add_argument("--beside-images", action="store_true",
                       help="write each .txt next to its image instead of under --out")
    infer.add_argument("--model", type=Path, default=DEFAULTS["model_path"],
                       help="Ultralytics .pt weights file (env IMAGE_ETL_MODEL)")
    _setting_flags(infer)
    infer.add_argument("--staging", default=None,
                       help="JSONL of finished images (a file or an s3:// object); makes the run "
                            "resumable")
    infer.add_argument("--summary", type=Path, default=None, help="write a JSON summary here")
    db = sub.add_parser("db", help="the results database's schema (Alembic): upgrade it, "
                                   "show its revision, list the revisions")
    db.add_argument("action", choices=("upgrade", "current", "history"))
    db.add_argument("--db-url", default=None,
                    help="default: $IMAGE_ETL_DB_URL, else the SQLite file under $AIRFLOW_HOME")
    db.add_argument("--revision", default="head", help="upgrade to this revision (default head)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from image_etl.atomic_files import OutputWriteError
    from image_etl.devices import DeviceError
    from image_etl.model import ModelLoadError
    from image_etl.storage import StorageError

    try:
        if args.command == "make-drop":
            return _make_drop(args)
        if args.command == "db":
            return _db(args)
        return _infer(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ModelLoadError, DeviceError, OutputWriteError, StorageError) as exc:
        # Expected failures say everything in one line; a traceback would only bury it
        # (-v shows it).
        log.debug("traceback", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _make_drop(args: argparse.Namespace) -> int:
    from image_etl import synth

    width, height = args.size
    paths = synth.make_drop(args.dir, args.date, args.count, width=width, height=height,
                            seed=args.seed, quality=args.quality, defects=args.defects)
    size = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} images ({size / 1e6:.0f} MB) under {args.dir / args.date.isoformat()}"
          f", ground truth under {args.dir / synth.GROUND_TRUTH_DIR / args.date.isoformat()}")
    return 0


def _db(args: argparse.Namespace) -> int:
    """``db upgrade|current|history``: for operators who migrate before they deploy."""

    from image_etl import store

    if args.action == "history":
        print("\n".join(store.history()))
        return 0
    url = args.db_url or store.results_url()
    try:
        engine = store.engine_from_url(url)
        try:
            upgrade = args.action == "upgrade"
            revision = store.migrate(engine, args.revision) if upgrade else store.current_revision(engine)
        finally:
            engine.dispose()
    except store.StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    shown = revision or "none: not under Alembic yet (db upgrade creates or adopts the schema)"
    head = " (head)" if revision == store.head_revision() else ""
    print(f"{store.redact_url(url)}: revision {shown}{head}")
    return 0


def _infer(args: argparse.Namespace) -> int:
    from image_etl.discover import list_images
    from image_etl.model import load_model
    from image_etl.output_paths import OutputLayout
    from image_etl.storage import open_storage, parse_location
    from image_etl.worker import ImageTask, run_shard

    settings, device, max_failed = infer_settings(args)
    drop = parse_location(args.images_dir)
    root = drop.resolve() if isinstance(drop, Path) else None
    source = open_storage(root or drop)
    listing = list_images(root or source)
    tasks = [ImageTask(root / f.rel_path if root else None, f.rel_path) for f in listing.images]
    out = parse_location(args.out) if args.out else root
    if out is None:
        raise SettingsError("out", "give an output folder or s3:// prefix for a bucket drop")
    if args.beside_images and not isinstance(drop, Path):
        raise SettingsError("beside-images", "needs a local drop folder")
    model = load_model(args.model, device, precision=settings.precision, imgsz=settings.imgsz,
                       runtime=settings.runtime)
    layout = (OutputLayout(out.resolve(), beside_images=args.beside_images)
              if isinstance(out, Path) else open_storage(out))
    staging = _staging_target(args.staging)
    report = run_shard(tasks, model, settings, layout, staging_path=staging, source=source)
    summary = {"images_dir": source.url, "model": str(args.model), "model_sha256": model.sha256,
               "settings": settings.to_dict(), **report.to_dict()}
    if args.summary:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    print(f"{report.processed} images ({report.failed} failed, {report.resumed} resumed), "
          f"{report.detections} detections, {report.images_per_s:.2f} images/s")
    return _judge_failures(report, staging, max_failed)


def _staging_target(text: str | None) -> Any:
    """``--staging``: a local file, or an object (its folder's storage and its name)."""
    from image_etl.sink import StagingObject
    from image_etl.storage import open_storage, parse_location

    if text is None:
        return None
    where = parse_location(text)
    if isinstance(where, Path):
        return where
    folder, _, name = where.prefix.rpartition("/")
    if not name:
        raise SettingsError("staging", f"{where.url}: name an object, not a bucket")
    return StagingObject(open_storage(dataclasses.replace(where, prefix=folder)), name)


def infer_settings(args: argparse.Namespace) -> tuple[InferSettings, str, float]:
    """``infer``'s settings from its flags, all checked before any work (SettingsError naming
    the first bad one): the worker's settings, the one device, the max failed fraction."""
    values = _setting_values(args)
    max_failed = check("max_failed_fraction", values.pop("max_failed_fraction"))
    if args.out is None and not args.beside_images:
        raise SettingsError("out", "give an output folder, or --beside-images")
    device = _one_device(str(values.pop("devices")))
    return InferSettings.from_params(values), device, max_failed


def _one_device(spec: str) -> str:
    """``--device``: one device; ``auto`` is this host's first GPU, else the CPU."""
    from image_etl.devices import parse_devices

    devices = parse_devices(spec, param="device")
    if spec.strip().lower() == "auto":
        return devices[0]
    if len(devices) != 1:
        raise SettingsError("device", f"infer runs one worker on one device, got {devices}")
    return devices[0]


def _judge_failures(report: ShardReport, staging: Any, max_failed: float) -> int:
    """Status 3 when too many images failed. With a staging file every image done so far
    counts, so a resumed run that retries a few bad images is judged on the whole folder."""
    failures = report.failures
    total = report.processed
    if staging is not None:
        from image_etl.staging import read_staging

        records = _staged_records(staging, read_staging)
        failures = [{"rel_path": r["rel_path"], "error": r.get("error") or ""}
                    for r in records if r["status"] == "failed"]
        total = len(records)
    if not total or len(failures) / total <= max_failed:
        return 0
    first = "; ".join(f"{f['rel_path']}: {f['error']}" for f in failures[:3])
    more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
    print(f"error: {len(failures)} of {total} images failed, more than --max-failed-fraction="
          f"{max_failed}: {first}{more}", file=sys.stderr)
    return 3


def _staged_records(staging: Any, read: Any) -> list[dict[str, Any]]:
    """The staging file's records; an object is read into a temporary file first."""
    import tempfile

    if isinstance(staging, Path):
        return read(staging)[1]
    with tempfile.TemporaryDirectory(prefix="image_etl_staging_") as tmp:
        local = Path(tmp) / "staged.jsonl"
        local.write_bytes(staging.storage.read_bytes(staging.rel_path))
        return read(local)[1]
