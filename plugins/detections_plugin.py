"""Registers the Detections page (package ``image_etl_detections``) with the Airflow UI.

- a FastAPI sub-app, mounted by the api-server at ``/detections`` (built on its first request:
  task processes load plugins too);
- external views (iframes) with ``url_route``: "Detections" in the navigation, and a
  "Detections" tab on the DAG page and on each DAG run page (that run's images and counts).

Their ``href`` is relative (no leading slash): the UI resolves it against its base URL, so
the page works under a ``base_url`` sub-path. Airflow 3.3 cannot limit a DAG tab to one DAG:
on other DAGs the tab says that only ``nightly_detections`` records detections.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from image_etl_detections import DAG_ID, URL_PREFIX
from image_etl_detections.app import MountedApp

_HREF = URL_PREFIX.lstrip("/") + "/"


class DetectionsPlugin(AirflowPlugin):
    name = "image_etl_detections"
    fastapi_apps = [{"app": MountedApp(), "url_prefix": URL_PREFIX, "name": "Detections"}]
    external_views = [
        {"name": "Detections", "href": _HREF, "destination": "nav", "url_route": "detections"},
        {"name": "Detections", "href": _HREF + "?view=nights&dag_id={DAG_ID}",
         "destination": "dag", "url_route": "detections-dag"},
        {"name": "Detections", "href": _HREF + "?view=run&dag_id={DAG_ID}&run_id={RUN_ID}",
         "destination": "dag_run", "url_route": "detections-run"},
    ]


__all__ = ["DAG_ID", "DetectionsPlugin"]
