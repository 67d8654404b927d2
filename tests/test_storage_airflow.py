"""The DAG layer's storage options: from an Airflow ``aws`` connection to a working S3 storage,
against SeaweedFS (tests/s3.py). Connections come from ``AIRFLOW_CONN_*`` variables, the way a
deployment's secrets backend hands them to a task."""

from __future__ import annotations

import json
import logging

import pytest
from image_etl_airflow.storage import open_storage_for, storage_options

from image_etl.discover import IMAGE_EXTENSIONS
from image_etl.storage import StorageAccessError, StorageConfigError


def _aws_conn(monkeypatch, conn_id: str, login: str, password: str, **extra) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(
        {"conn_type": "aws", "login": login, "password": password, "extra": extra}))


@pytest.fixture
def drop(s3_server):
    bucket = s3_server.new_bucket()
    s3_server.client().put_object(Bucket=bucket, Key="night/a.jpg", Body=b"jpeg")
    return bucket


def test_connection_named_in_the_url(s3_server, drop, monkeypatch):
    _aws_conn(monkeypatch, "seaweed", s3_server.key, s3_server.secret,
              endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    options = storage_options(f"s3://seaweed@{drop}/night")
    assert options == {"key": s3_server.key, "secret": s3_server.secret,
                       "endpoint_url": s3_server.endpoint_url, "region_name": "us-east-1"}
    store = open_storage_for(f"s3://seaweed@{drop}/night")
    assert [e.rel_path for e in store.walk(IMAGE_EXTENSIONS).files] == ["a.jpg"]
    assert store.url == f"s3://{drop}/night"  # records show no connection, no credentials


def test_default_connection_from_the_environment(s3_server, drop, monkeypatch):
    _aws_conn(monkeypatch, "fleet_store", s3_server.key, s3_server.secret,
              service_config={"s3": {"endpoint_url": s3_server.endpoint_url}})
    monkeypatch.setenv("IMAGE_ETL_STORAGE_CONN_ID", "fleet_store")
    assert open_storage_for(f"s3://{drop}/night").read_bytes("a.jpg") == b"jpeg"


def test_local_paths_need_no_connection(tmp_path):
    assert storage_options(str(tmp_path)) is None
    assert open_storage_for(str(tmp_path)).url == str(tmp_path)


def test_a_named_connection_must_exist(drop):
    with pytest.raises(StorageConfigError, match=f"s3://{drop}/night: the Airflow connection "
                                                 "'not_there' named in the URL is not defined"):
        storage_options(f"s3://not_there@{drop}/night")


def test_wrong_secret_in_the_connection_is_one_clean_line(s3_server, drop, monkeypatch, caplog,
                                                          capsys):
    wrong = "wrong-secret-0123456789abcdef"
    _aws_conn(monkeypatch, "seaweed_bad", s3_server.key, wrong,
              endpoint_url=s3_server.endpoint_url)
    caplog.set_level(logging.DEBUG)
    store = open_storage_for(f"s3://seaweed_bad@{drop}/night")
    with pytest.raises(StorageAccessError, match=f"s3://{drop}/night.*access denied") as err:
        store.walk(IMAGE_EXTENSIONS)
    out = capsys.readouterr()
    for text in (str(err.value), repr(err.value), caplog.text, out.out, out.err):
        assert wrong not in text and s3_server.secret not in text
    assert "\n" not in str(err.value)


def test_a_private_ca_in_the_connection_reaches_an_https_endpoint(s3_server, drop, monkeypatch):
    """A MinIO or Ceph behind a certificate of the company's own CA: the connection's extra
    ``verify`` names the CA bundle; without it the one-line error says what to set."""
    _aws_conn(monkeypatch, "private_tls", s3_server.key, s3_server.secret,
              endpoint_url=s3_server.https_endpoint_url)
    with pytest.raises(StorageConfigError,  # not retried: a retry meets the same certificate
                       match=r"TLS with https://127\.0\.0\.1:\d+ failed \(SSLError: certificate "
                             r"not trusted\).*extra \"verify\"") as refused:
        open_storage_for(f"s3://private_tls@{drop}/night").read_bytes("a.jpg")
    assert s3_server.secret not in str(refused.value)

    _aws_conn(monkeypatch, "private_tls", s3_server.key, s3_server.secret,
              endpoint_url=s3_server.https_endpoint_url, verify=s3_server.ca_bundle)
    assert storage_options(f"s3://private_tls@{drop}/night")["verify"] == s3_server.ca_bundle
    assert open_storage_for(f"s3://private_tls@{drop}/night").read_bytes("a.jpg") == b"jpeg"

    # "false" in the extra turns verification off (the connection owner's call).
    _aws_conn(monkeypatch, "private_tls", s3_server.key, s3_server.secret,
              endpoint_url=s3_server.https_endpoint_url, verify="false")
    assert storage_options(f"s3://private_tls@{drop}/night")["verify"] == "false"
    assert open_storage_for(f"s3://private_tls@{drop}/night").read_bytes("a.jpg") == b"jpeg"


def test_a_missing_ca_bundle_is_refused_naming_the_option(s3_server, drop, monkeypatch, tmp_path):
    _aws_conn(monkeypatch, "private_tls", s3_server.key, s3_server.secret,
              endpoint_url=s3_server.https_endpoint_url, verify=str(tmp_path / "none.pem"))
    with pytest.raises(StorageConfigError, match="storage option verify: no CA bundle file at"):
        open_storage_for(f"s3://private_tls@{drop}/night")
