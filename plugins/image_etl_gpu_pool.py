"""Airflow plugin: the ``gpu`` pool exists whenever a nightly_detections run starts.

Airflow leaves a task whose pool does not exist in ``scheduled`` forever and says so only in
the scheduler's log, so a fresh install (``airflow standalone``, a new metadata DB) would wait
silently at ``infer``. This listener runs in the scheduler when a run of the DAG starts and,
if the pool is missing, creates it with one slot per GPU of the fleet (``IMAGE_ETL_GPUS``, else
this host's GPUs, else 1), in the scheduler's own transaction, and logs a warning. A deployment
that sizes the pool itself (docker-compose's init, ``airflow pools set``) never sees it act.
"""

from __future__ import annotations

import logging
import os

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)

DAG_ID = os.environ.get("IMAGE_ETL_DAG_ID", "nightly_detections")
POOL = os.environ.get("IMAGE_ETL_GPU_POOL", "gpu")
DESCRIPTION = ("created by the image_etl plugin: one slot per GPU of the fleet "
               "(resize it with `airflow pools set`)")


def _fleet_slots() -> int:
    try:
        from image_etl.devices import fleet_gpu_count

        return max(1, fleet_gpu_count())
    except Exception:  # a bad IMAGE_ETL_GPUS: the DAG's discover names it; one slot is safe
        log.exception("cannot count the fleet's GPUs; the %r pool gets one slot", POOL)
        return 1


def ensure_pool(session, name: str = POOL) -> bool:
    """Create pool ``name`` in ``session`` if missing; True if it was created."""
    from airflow.models.pool import Pool
    from sqlalchemy import select

    with session.begin_nested():  # a race with another scheduler rolls back only this
        if session.scalar(select(Pool.id).where(Pool.pool == name)) is not None:
            return False
        slots = _fleet_slots()
        session.add(Pool(pool=name, slots=slots, description=DESCRIPTION, include_deferred=False))
    log.warning("pool %r did not exist: created it with %d slot(s) for %s's infer tasks "
                "(size it to your GPUs: airflow pools set %s <GPUs> ...)", name, slots, DAG_ID,
                name)
    return True


class GpuPoolListener:
    @hookimpl
    def on_dag_run_running(self, dag_run, msg: str) -> None:
        if dag_run.dag_id != DAG_ID:
            return
        from sqlalchemy.orm import object_session

        session = object_session(dag_run)
        if session is None:
            from airflow.utils.session import create_session

            with create_session() as own:
                ensure_pool(own)
            return
        ensure_pool(session)


class ImageEtlGpuPoolPlugin(AirflowPlugin):
    name = "image_etl_gpu_pool"
    listeners = [GpuPoolListener()]
