"""The Detections page of the Airflow UI (registered by ``plugins/detections_plugin.py``).

``app.create_app()`` builds the FastAPI sub-app the api-server mounts at ``/detections``.
Every task process loads the plugins too, so importing this package stays cheap: Airflow's
API internals, the engine (``image_etl``) and the image libraries are imported on first use.
"""

from __future__ import annotations

import sys
from pathlib import Path

DAG_ID = "nightly_detections"
URL_PREFIX = "/detections"

# Deployments that mount plugins/ and include/ side by side without installing the package
# (as dags/nightly_detections.py does).
_INCLUDE = Path(__file__).resolve().parents[2] / "include"
if _INCLUDE.is_dir() and str(_INCLUDE) not in sys.path:
    sys.path.append(str(_INCLUDE))
