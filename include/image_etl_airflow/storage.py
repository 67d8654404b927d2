"""Airflow glue: object-storage options for the engine, from an Airflow ``aws`` connection.

The engine (``image_etl.storage``) takes plain options (key, secret, token, endpoint URL,
region) and never reads Airflow connections; this module derives them, the way Airflow's own
``ObjectStoragePath`` does (``airflow.providers.amazon.aws.fs.s3.get_fs``): the connection
named in the URL (``s3://conn_id@bucket/prefix``), else ``IMAGE_ETL_STORAGE_CONN_ID`` (default
``aws_default``), read through the Amazon provider's ``AwsConnectionWrapper`` (login = key id,
password = secret, extra ``endpoint_url`` / ``service_config.s3.endpoint_url`` for
S3-compatible servers, extra ``region_name``, ``aws_session_token``, and ``verify``: the path
of the CA bundle that signed a private endpoint's certificate, or false). A connection with a
``role_arn`` or a ``profile_name`` and no key gets the provider's session credentials (temporary:
they last as long as the provider's session, usually an hour).

The options hold secrets: call :func:`open_storage_for` inside the task that uses the storage;
never return the options from a task (XCom), log them or put them in an error.

The DAG's tasks, the drop-ready trigger and the Detections page share it; nothing here runs
at import.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_CONN_ID = "aws_default"


def storage_conn_id(location: Any) -> str:
    """The connection of an object URL: the one it names, else IMAGE_ETL_STORAGE_CONN_ID."""
    return location.conn_id or os.environ.get("IMAGE_ETL_STORAGE_CONN_ID") or DEFAULT_CONN_ID


def _sdk_connection(conn_id: str) -> Any | None:
    """The connection through the Task SDK (tasks, dag.test), None if it is not defined."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return Connection.get(conn_id)
    except AirflowNotFoundException:
        return None


async def _sdk_connection_async(conn_id: str) -> Any | None:
    """The connection from code on an event loop (a trigger): the SDK's async lookup."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return await Connection.async_get(conn_id)
    except AirflowNotFoundException:
        return None


async def storage_options_async(url: str | Path) -> dict[str, Any] | None:
    """:func:`storage_options` for a trigger in the triggerer: the connection is looked up
    without blocking the loop (a sync lookup there deadlocks), the rest (an STS call for a
    role) runs in a thread."""
    from image_etl.storage import parse_location

    location = parse_location(url)
    if isinstance(location, Path):
        return None
    conn = await _sdk_connection_async(storage_conn_id(location))
    return await asyncio.to_thread(storage_options, url, lambda _conn_id: conn)


def storage_options(url: str | Path,
                    get_connection: Callable[[str], Any | None] = _sdk_connection
                    ) -> dict[str, Any] | None:
    """The engine's options for ``url``: None for a local path; for an object URL, the
    connection's key, secret, token, endpoint and region (only those set).

    A connection named in the URL must exist. The default connection may be missing: boto's
    own credential chain then applies (an instance role, the environment), as with Airflow's
    S3 hook. ``get_connection`` returns the connection or None (the UI plugin passes the API
    server's lookup).
    """
    from image_etl.storage import StorageConfigError, parse_location

    location = parse_location(url)
    if isinstance(location, Path):
        return None
    conn_id = storage_conn_id(location)
    conn = get_connection(conn_id)
    if conn is None:
        if location.conn_id:
            raise StorageConfigError(f"{location.url}: the Airflow connection {conn_id!r} named in "
                                     "the URL is not defined")
        log.info("no Airflow connection %r for %s: using boto's default credentials",
                 conn_id, location.url)
        return {}
    return _options_from_connection(conn, conn_id)


def _options_from_connection(conn: Any, conn_id: str) -> dict[str, Any]:
    from airflow.providers.amazon.aws.utils.connection_wrapper import AwsConnectionWrapper

    from image_etl.storage import StorageConfigError

    try:
        wrapper = AwsConnectionWrapper(conn)
    except Exception as exc:  # the provider's own checks; its message names fields, not values
        raise StorageConfigError(f"Airflow connection {conn_id!r}: not a usable aws connection "
                                 f"({type(exc).__name__})") from None
    key, secret, token = (wrapper.aws_access_key_id, wrapper.aws_secret_access_key,
                          wrapper.aws_session_token)
    if not key and (wrapper.role_arn or wrapper.profile_name):
        key, secret, token = _session_credentials(conn_id)
    options = {"key": key, "secret": secret, "token": token,
               "endpoint_url": wrapper.get_service_endpoint_url("s3"),
               "region_name": wrapper.region_name}
    options = {k: v for k, v in options.items() if v}
    if wrapper.verify is not None:  # extra "verify": a CA bundle's path, or false
        options["verify"] = wrapper.verify
    return options


def _session_credentials(conn_id: str) -> tuple[str | None, str | None, str | None]:
    """Assumed-role / profile credentials, as the provider's S3 hook gets them."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    creds = S3Hook(aws_conn_id=conn_id).get_credentials()
    return creds.access_key, creds.secret_key, creds.token


def open_storage_for(url: str | Path,
                     get_connection: Callable[[str], Any | None] = _sdk_connection) -> Any:
    """``image_etl.storage.open_storage(url, options)`` with the options of ``url``'s connection."""
    from image_etl.storage import open_storage

    return open_storage(url, storage_options(url, get_connection))
