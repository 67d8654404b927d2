"""Airflow plugin: the ``gpu`` pool exists once Airflow's scheduler is up.

Airflow leaves a task whose pool does not exist in ``scheduled`` forever and says so only in
the scheduler's log, so a fresh install (``airflow standalone``, a new metadata DB) would wait
silently at nightly_detections' ``infer``. When an Airflow component with database access
starts (the scheduler, the DAG processor, the triggerer), this listener creates the pool if it
is missing, with one slot per GPU of the fleet (``IMAGE_ETL_GPUS``, else this host's GPUs,
else 1), and logs a warning. A deployment that sizes the pool itself (docker-compose's init,
``airflow pools set``) never sees it act. (Not at run start: the scheduler forbids commits
inside its scheduling transaction.)
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


def ensure_pool(name: str = POOL) -> bool:
    """Create pool ``name`` if it is missing; True if this call created it."""
    from airflow.models.pool import Pool
    from airflow.utils.session import create_session
    from sqlalchemy import select
    from sqlalchemy.exc import IntegrityError

    try:
        with create_session() as session:
            if session.scalar(select(Pool.id).where(Pool.pool == name)) is not None:
                return False
            slots = _fleet_slots()
            session.add(Pool(pool=name, slots=slots, description=DESCRIPTION,
                             include_deferred=False))
    except IntegrityError:  # another component created it at the same moment
        return False
    log.warning("pool %r did not exist: created it with %d slot(s) for %s's infer tasks "
                "(size it to your GPUs: airflow pools set %s <GPUs> ...)", name, slots, DAG_ID,
                name)
    return True


class GpuPoolListener:
    @hookimpl
    def on_starting(self, component) -> None:
        # Jobs (scheduler, DAG processor, triggerer) have the metadata DB; task processes do not.
        if type(component).__name__ == "Job":
            ensure_pool()


class ImageEtlGpuPoolPlugin(AirflowPlugin):
    name = "image_etl_gpu_pool"
    listeners = [GpuPoolListener()]
