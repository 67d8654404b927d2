"""nightly_detections: a night's image drop → YOLO on every device → rows in the results DB.

Wiring, params and schedule only. The work is in ``include/image_etl`` (``image_etl.stages``);
heavy imports (torch, ultralytics, cv2) happen inside tasks, never at parse time.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

from airflow.sdk import Asset, Param, dag, get_current_context, task
from airflow.sdk.definitions.param import ParamsDict
from airflow.sdk.exceptions import AirflowFailException

# Deployments that mount dags/ and include/ side by side without installing the package.
_INCLUDE = Path(__file__).resolve().parents[1] / "include"
if _INCLUDE.is_dir() and str(_INCLUDE) not in sys.path:
    sys.path.append(str(_INCLUDE))

from image_etl.settings import SettingsError, env_defaults  # noqa: E402  (stdlib only, cheap)

DAG_ID = "nightly_detections"
DB_CONN_ID = "image_etl_db"
GPU_POOL = os.environ.get("IMAGE_ETL_GPU_POOL", "gpu")
GPU_QUEUE = os.environ.get("IMAGE_ETL_GPU_QUEUE", "gpu")
DETECTIONS = Asset(name="image_etl_detections", uri="image-etl://results/detections")
D = env_defaults()

DOC = """
### Nightly detections

Finds the night's images under **drop_dir**, splits them by bytes across **devices** (one mapped
`infer` task per GPU, or per `cpu` entry), runs the YOLO model with a streaming decode → infer →
write pipeline, writes one YOLO `.txt` per image under **output_dir**/labels, and loads every
image and detection into the results database (connection `image_etl_db`, else a SQLite file).

* **Drop date** = the run's logical date, unless the `date` param overrides it. Templates:
  `{date}` (YYYY-MM-DD) and `{model}` (weights file name) in `drop_dir` / `output_dir`.
* **Re-runs are safe**: a run, a cleared task or a backfill replaces the rows of each
  (image, model) in one transaction. Images already loaded for this model are skipped unless
  **reprocess** is on. A retried `infer` resumes where the failed attempt stopped.
* **Bad images** become `failed` rows with their reason; the run fails only if more than
  `max_failed_fraction` of the images failed.
* `infer` runs on the `gpu` queue and pool (size the pool to your GPU count); a per-host lock
  file per GPU keeps two tasks off one GPU even when a backfill overlaps the nightly run.
"""

PARAMS = {
    "date": Param(None, type=["null", "string"], format="date", title="Drop date",
                  description="YYYY-MM-DD. Empty: the run's logical date.", section="What to process"),
    "drop_dir": Param(D["drop_dir"], type="string", minLength=1, title="Drop folder",
                      description="Absolute path; {date} is replaced by the drop date.",
                      section="What to process"),
    "output_dir": Param(D["output_dir"], type="string", minLength=1, title="Output folder",
                        description="Absolute path for labels/, annotated/ and run files; "
                                    "{date} and {model} are replaced.", section="What to process"),
    "reprocess": Param(False, type="boolean", title="Reprocess",
                       description="Also process images already loaded for this model (their rows "
                                   "are replaced, never duplicated).", section="What to process"),
    "model_path": Param(D["model_path"], type="string", minLength=1, title="Model weights",
                        description="Absolute path to an Ultralytics .pt file (never downloaded).",
                        section="Model"),
    "imgsz": Param(D["imgsz"], type=["null", "integer"], minimum=32, maximum=8192, multipleOf=32,
                   title="Image size", description="Model input size; empty = the model's own.",
                   section="Model"),
    "conf": Param(D["conf"], type="number", minimum=0, maximum=1, title="Confidence threshold",
                  section="Model"),
    "iou": Param(D["iou"], type="number", minimum=0, maximum=1, title="NMS IoU threshold",
                 section="Model"),
    "devices": Param(D["devices"], type="string", minLength=1, title="Devices",
                     description="'auto' (every GPU), 'cpu', 'cpu,cpu', '0,1' or 'cuda:0,cuda:1'. "
                                 "One mapped infer task per device.", section="Compute"),
    "batch_size": Param(D["batch_size"], type="integer", minimum=1, maximum=1024,
                        title="Batch size", description="Images per forward pass (halved "
                        "automatically on GPU out-of-memory).", section="Compute"),
    "fast_decode": Param(D["fast_decode"], type="boolean", title="Fast decode",
                         description="Reduced-scale JPEG decode when the model input is much "
                                     "smaller than the image (2-8x faster, pixels differ slightly).",
                         section="Compute"),
    "runtime": Param(D["runtime"], type="string", enum=["auto", "torch", "openvino"],
                     title="Runtime", description="Forward pass on CPU devices: 'auto' uses "
                     "OpenVINO when installed (about half the CPU time of PyTorch, same "
                     "detections to float rounding); GPUs always run PyTorch.", section="Compute"),
    "save_annotated": Param(D["save_annotated"], type="boolean", title="Save annotated images",
                            description="Also write each image with its boxes drawn.",
                            section="Outputs"),
    "settle_seconds": Param(D["settle_seconds"], type="number", minimum=0, maximum=86400,
                            title="Settle time (s)", description="Files modified more recently "
                            "are still being written: left for the next run.", section="Outputs"),
    "max_failed_fraction": Param(D["max_failed_fraction"], type="number", minimum=0, maximum=1,
                                 title="Max failed fraction", description="Fail the run when more "
                                 "than this fraction of the drop's images could not be read "
                                 "(their rows are loaded all the same).", section="Outputs"),
}


def _db_url() -> str:
    """The results DB: connection ``image_etl_db`` if defined, else IMAGE_ETL_DB_URL / SQLite."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    from image_etl.store import default_url, url_from_connection

    try:
        conn = Connection.get(DB_CONN_ID)
    except AirflowNotFoundException:
        return os.environ.get("IMAGE_ETL_DB_URL") or default_url()
    return url_from_connection(conn.conn_type, host=conn.host, port=conn.port, login=conn.login,
                               password=conn.password, schema=conn.schema)


def _run_date(context) -> object:
    when = context.get("logical_date") or context["dag_run"].run_after
    return when.in_timezone(context["dag"].timezone).date()


@dag(
    dag_id=DAG_ID,
    schedule=D["schedule"],
    catchup=False,
    max_active_runs=2,
    params=ParamsDict(PARAMS),
    tags=["images", "yolo", "gpu"],
    doc_md=DOC,
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30)},
)
def nightly_detections():
    @task
    def discover() -> dict:
        from image_etl import stages

        ctx = get_current_context()
        try:
            return stages.discover(dict(ctx["params"]), run_id=ctx["run_id"],
                                   run_date=_run_date(ctx), db_url=_db_url(),
                                   allowed_roots=D["allowed_roots"])
        except SettingsError as exc:
            # A bad parameter will not fix itself: fail now, naming it, instead of retrying.
            raise AirflowFailException(f"invalid parameter {exc}") from exc

    @task
    def partition(discovered: dict) -> list[dict]:
        from image_etl import stages

        return stages.partition(discovered)

    @task(queue=GPU_QUEUE, pool=GPU_POOL, retries=2, retry_delay=timedelta(minutes=1),
          retry_exponential_backoff=True,
          map_index_template="{{ shard_label }}")
    def infer(shard: dict) -> dict:
        from image_etl import stages

        context = get_current_context()
        context["shard_label"] = f"{shard['device']} · {shard['images']} images"
        result = stages.infer(shard)
        # The label is rendered when the task ends: show the GPU actually leased ('cuda' → 'cuda:1').
        context["shard_label"] = f"{result['device']} · {shard['images']} images"
        return result

    @task(trigger_rule="none_failed", retries=3, retry_delay=timedelta(seconds=30),
          retry_exponential_backoff=True,
          outlets=[DETECTIONS])
    def load(discovered: dict, results: list[dict]) -> dict:
        from image_etl import stages

        # One slice fetches every shard's result in one request; iterating would ask item by
        # item until one is missing, which Airflow logs as a warning ("XCom not found").
        shard_results = list(results[:]) if results else []
        return stages.load(discovered, shard_results, db_url=_db_url(), dag_id=DAG_ID)

    @task(trigger_rule="none_failed")
    def report(discovered: dict, loaded: dict) -> dict:
        from image_etl import stages

        try:
            return stages.report(discovered, loaded, db_url=_db_url())
        except stages.TooManyFailedError as exc:
            # The rows are loaded; retrying would read the same counts. Fail once, visibly.
            raise AirflowFailException(str(exc)) from exc

    found = discover()
    shards = partition(found)
    results = infer.expand(shard=shards)
    loaded = load(found, results)
    report(found, loaded)


nightly_detections()
