"""Who may see the page: an authenticated Airflow user with read access to the DAG and its runs.

Airflow does not protect a plugin's routes: the app depends on ``require_reader`` for every
one. The user is Airflow's public ``GetUserDep`` dependency (a bearer JWT, else the UI's
``_token`` cookie, which the UI's iframe sends; 401 without credentials, 401/403 for a bad or
expired token), resolved by FastAPI, as Airflow's plugin documentation shows; access is asked
of the auth manager through ``get_auth_manager()``. Not ``request.app.state.auth_manager``:
inside a mounted sub-app, ``request.app`` is the sub-app, whose state has no auth manager.
"""

from __future__ import annotations

from typing import Any

from airflow.api_fastapi.core_api.security import GetUserDep
from fastapi import HTTPException, status

from image_etl_detections import DAG_ID


def can_read(user: Any) -> bool:
    """GET on the DAG and on its runs, as the auth manager decides (the DAG's team included)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import (
        DagAccessEntity,
        DagDetails,
    )
    from airflow.models.dag import DagModel

    details = DagDetails(id=DAG_ID, team_name=DagModel.get_team_name(DAG_ID))
    return get_auth_manager().batch_is_authorized_dag(
        [{"method": "GET", "details": details},
         {"method": "GET", "access_entity": DagAccessEntity.RUN, "details": details}], user=user)


def require_reader(user: GetUserDep) -> Any:
    """The app-wide dependency (a plain function: FastAPI runs it off the event loop)."""
    if not can_read(user):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"no read access to the {DAG_ID} DAG")
    return user
