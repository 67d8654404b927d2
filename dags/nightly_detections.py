"""nightly_detections: a night's image drop → YOLO on every device → rows in the results DB.

Wiring, params and schedule only. The work is in the ``image_etl`` package (``include/``,
installed into the environment); heavy imports (torch, ultralytics, cv2) happen inside tasks,
never at parse time.
"""

from __future__ import annotations

import datetime as dt
import os
from datetime import timedelta

from airflow.sdk import (
    Asset,
    ExceptionRetryPolicy,
    Param,
    RetryAction,
    RetryRule,
    dag,
    get_current_context,
    task,
)
from airflow.sdk.definitions.param import ParamsDict

from image_etl import errors
from image_etl.settings import DAG_PARAMS, SETTINGS, env_defaults

DAG_ID = "nightly_detections"
DB_CONN_ID = "image_etl_db"
GPU_POOL = os.environ.get("IMAGE_ETL_GPU_POOL", "gpu")
GPU_QUEUE = os.environ.get("IMAGE_ETL_GPU_QUEUE", "gpu")
DETECTIONS = Asset(name="image_etl_detections", uri="image-etl://results/detections")
D = env_defaults()

DOC = f"""
### Nightly detections

Finds the night's images under **drop_dir**, splits them by bytes across **devices** (one mapped
`infer` task per GPU, or per `cpu` entry), runs the YOLO model with a streaming decode → infer →
write pipeline, writes one YOLO `.txt` per image under **output_dir**/labels, and loads every
image and detection into the results database (connection `{DB_CONN_ID}`, else a SQLite file).

* **Which drop**: the `date` param, else the run's date in the DAG's timezone (its logical
  date; a run triggered without one, over REST or `airflow dags trigger`, uses the time it was
  triggered) plus **drop_date_offset_days**. With the default schedule (02:00) and offset 0, the
  run at D 02:00 processes drop D; set the offset to -1 for folders named by capture day.
* **Backfills** pick runs by logical date, and the runs tick at 02:00: a range of whole days
  must end at 23:59 of its last day (`--to-date 2026-11-07T23:59:59`), or that day is left out.
* **Drop-ready gate** (optional): with **drop_ready_marker** set (e.g. `_SUCCESS`),
  `wait_for_drop` waits in the triggerer (no worker slot) until that file is in the night's
  drop folder, up to **drop_wait_timeout** seconds; then it fails naming the folder and the
  marker, or goes on if **drop_wait_on_timeout** is `proceed`.
* **Complete loads**: `load` commits a night only if every listed image has an outcome; an
  `infer` marked success or skipped before it ran fails the load, naming its shard and images.
* **Re-runs are safe**: a run, a cleared task or a backfill replaces the rows of each
  (image, model) in one transaction. Images already loaded for this model with these result
  settings are skipped unless **reprocess** is on. A retried `infer` resumes where the failed
  attempt stopped.
* **Late files**: each run also loads, into their own night, the images of the
  **catchup_nights** earlier nights that have no row yet (still being written at their night's run).
* **Bad images** become `failed` rows with their reason; the run fails only if more than
  `max_failed_fraction` of the images failed. A bad parameter, unusable weights or a missing
  staging file fail their task at once (no retry).
* **GPUs**: `infer` runs on the `{GPU_QUEUE}` queue and in the **`{GPU_POOL}` pool, which must
  exist** (`airflow pools set {GPU_POOL} <number of GPUs> "one slot per GPU"`; the project's
  plugin creates it when the scheduler starts without it, sized by `IMAGE_ETL_GPUS`, and says
  so in the scheduler's log). A per-host lock file per GPU keeps two tasks off one GPU even when a
  backfill overlaps the nightly run. Each `infer` has a time limit of 15 minutes plus
  **timeout_per_image_s** per image of its shard.
"""

# A bad parameter, unusable or changed weights, a staging file that is not there or a drop
# with too many bad images: no retry can fix these, so the task fails at once.
RETRY_POLICY = ExceptionRetryPolicy(rules=[RetryRule(
    exception=[f"{e.__module__}.{e.__qualname__}" for e in errors.NOT_RETRYABLE],
    action=RetryAction.FAIL, reason="not transient: a retry would fail the same way")])


def _params() -> ParamsDict:
    """The trigger form, from the one declaration in image_etl.settings."""
    return ParamsDict({name: Param(D[name], **SETTINGS[name].json_schema()) for name in DAG_PARAMS})


def _db_url() -> str:
    """The results DB: connection ``image_etl_db`` if defined, else IMAGE_ETL_DB_URL / SQLite."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    from image_etl.store import results_url

    try:
        conn = Connection.get(DB_CONN_ID)
    except AirflowNotFoundException:
        conn = None
    return results_url(conn)


def _open_storage(location: str):
    """A drop or output location's storage, with options from its Airflow connection
    (include/image_etl_airflow/storage.py), inside the task: options hold secrets, never in XCom."""
    from image_etl_airflow.storage import open_storage_for

    return open_storage_for(location)


def _run_date(context) -> dt.date:
    """The run's date in the DAG's timezone: its logical date, or when it was triggered for a
    run without one (REST and CLI triggers by default, asset-triggered runs)."""
    when = context.get("logical_date") or context["dag_run"].run_after
    return when.astimezone(context["dag"].timezone).date()


def _infer_time_limit(context) -> None:
    """pre_execute of infer: its execution_timeout, sized to its own shard."""
    from image_etl import stages

    limit = timedelta(seconds=stages.infer_time_limit_s(context["task"].op_kwargs["shard"]))
    context["task"].execution_timeout = limit
    print(f"infer time limit: {limit} for {context['task'].op_kwargs['shard']['images']} image(s)")


def _wait_for_drop():
    """The optional drop-ready gate (``drop_ready_marker``): waits in the triggerer."""
    from image_etl_airflow.drop_gate import WaitForDrop

    return WaitForDrop(task_id="wait_for_drop", run_date=_run_date, allowed_roots=D["allowed_roots"],
                       execution_timeout=timedelta(minutes=10))


@dag(
    dag_id=DAG_ID,
    schedule=D["schedule"],
    catchup=False,
    max_active_runs=2,
    params=_params(),
    tags=["images", "yolo", "gpu"],
    doc_md=DOC,
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30), "retry_policy": RETRY_POLICY,
                  "execution_timeout": timedelta(minutes=30)},
)
def nightly_detections():
    @task(multiple_outputs=False)
    def discover() -> dict:
        from image_etl import stages

        ctx = get_current_context()
        return stages.discover(dict(ctx["params"]), run_id=ctx["run_id"], run_date=_run_date(ctx),
                               db_url=_db_url(), allowed_roots=D["allowed_roots"],
                               open_storage=_open_storage)

    @task(execution_timeout=timedelta(minutes=10))
    def partition(discovered: dict) -> list[dict]:
        from image_etl import stages

        return stages.partition(discovered, open_storage=_open_storage)

    @task(queue=GPU_QUEUE, pool=GPU_POOL, retries=2, retry_delay=timedelta(minutes=1),
          retry_exponential_backoff=True, multiple_outputs=False,
          # The real limit is set per shard (pre_execute); this one bounds a shard of any size.
          execution_timeout=timedelta(days=2), pre_execute=_infer_time_limit,
          map_index_template="{{ shard_label }}")
    def infer(shard: dict) -> dict:
        from image_etl import stages

        context = get_current_context()
        context["shard_label"] = stages.shard_label(shard)
        result = stages.infer(shard, open_storage=_open_storage)
        # The label is rendered when the task ends: show the GPU actually leased ('cuda' → 'cuda:1').
        context["shard_label"] = stages.shard_label(shard, result["device"])
        return result

    @task(trigger_rule="none_failed", retries=3, retry_delay=timedelta(seconds=30),
          retry_exponential_backoff=True, multiple_outputs=False,
          execution_timeout=timedelta(hours=2), outlets=[DETECTIONS])
    def load(discovered: dict, results: list[dict], plan: list[dict]) -> dict:
        from image_etl import stages

        # One slice fetches every shard's result in one request; iterating would ask item by
        # item until one is missing, which Airflow logs as a warning ("XCom not found").
        shard_results = list(results[:]) if results else []
        # partition's shards: a shard whose infer left no result (marked success or skipped
        # by hand) is found and named, never silently left out of the night.
        return stages.load(discovered, shard_results, db_url=_db_url(), dag_id=DAG_ID,
                           plan=list(plan or []), open_storage=_open_storage)

    @task(trigger_rule="none_failed", multiple_outputs=False,
          execution_timeout=timedelta(minutes=15))
    def report(discovered: dict, loaded: dict) -> dict:
        from image_etl import stages

        return stages.report(discovered, loaded, db_url=_db_url())

    ready = _wait_for_drop()
    found = discover()
    ready >> found
    shards = partition(found)
    results = infer.expand(shard=shards)
    loaded = load(found, results, shards)
    report(found, loaded)


nightly_detections()
