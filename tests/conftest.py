"""Shared fixtures: the shipped demo model, synthetic drops, a loaded model per session."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .s3 import s3_server  # noqa: F401  (the SeaweedFS S3 fixture, for every test module)

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
# Airflow reads its configuration at import: point it at a throwaway home before anything does.
AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="image_etl_airflow_"))
os.environ["AIRFLOW_HOME"] = str(AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
# OpenVINO copies of the model (runtime auto on CPU) go to a per-session cache, not ~/.cache.
os.environ["IMAGE_ETL_CACHE_DIR"] = tempfile.mkdtemp(prefix="image_etl_cache_")
DEMO_MODEL = Path(os.environ.get("IMAGE_ETL_TEST_MODEL", ROOT / "models" / "demo-yolo11n-2cls.pt"))
# Tests copy and spoil weights under their tmp_path: the test deployment's model roots are the
# shipped models and the temporary folder (test_weights checks the confinement itself).
os.environ.setdefault("IMAGE_ETL_MODEL_ROOTS", os.pathsep.join([str(DEMO_MODEL.parent),
                                                                tempfile.gettempdir()]))
DROP_DATE = dt.date(2026, 11, 20)
PRECISIONS = ("fp16", "fp32")


def pytest_addoption(parser):
    group = parser.getgroup("image_etl")
    group.addoption("--parity-device", default=os.environ.get("IMAGE_ETL_PARITY_DEVICE", "cpu"),
                    help="device of the parity test with model.predict: cpu (default) or cuda:N "
                         "(env IMAGE_ETL_PARITY_DEVICE)")
    group.addoption("--parity-precision",
                    default=os.environ.get("IMAGE_ETL_PARITY_PRECISION", "fp32"),
                    help="comma list of fp16, fp32 (default fp32; fp16 needs a CUDA device; "
                         "env IMAGE_ETL_PARITY_PRECISION)")


def pytest_generate_tests(metafunc):
    """``parity_case``: (device, half) for each precision asked for; ids ``parity-cpu-fp32``."""
    if "parity_case" not in metafunc.fixturenames:
        return
    device = metafunc.config.getoption("--parity-device").strip().lower()
    if device.isdigit():
        device = f"cuda:{device}"
    precisions = [p.strip().lower() for p in
                  metafunc.config.getoption("--parity-precision").split(",") if p.strip()]
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise pytest.UsageError(f"--parity-precision: {unknown or 'empty'}; use fp16 and/or fp32")
    if "fp16" in precisions and not device.startswith("cuda"):
        # load_model runs fp16 on CUDA only: on the CPU "fp16" would quietly be fp32.
        raise pytest.UsageError(f"--parity-precision fp16 needs a CUDA device, not {device!r}")
    metafunc.parametrize("parity_case", [(device, p == "fp16") for p in precisions],
                         ids=[f"parity-{device}-{p}" for p in precisions], scope="module")


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    assert DEMO_MODEL.is_file(), f"demo model missing: {DEMO_MODEL} (scripts/train_demo_model.py)"
    return DEMO_MODEL


@pytest.fixture(scope="session")
def cpu_model(demo_model_path):
    from image_etl.model import load_model

    return load_model(demo_model_path, "cpu")


@pytest.fixture(scope="session")
def full_drop(tmp_path_factory) -> Path:
    """Twenty full-size (2048 x 12000) images with ground truth, a seed the model never saw."""
    from image_etl import synth

    root = tmp_path_factory.mktemp("drops")
    synth.make_drop(root, DROP_DATE, 20, seed=20261120)
    return root


@pytest.fixture(scope="session")
def small_drop(tmp_path_factory) -> Path:
    """Eight quarter-size images: quick to decode, same scene statistics."""
    from image_etl import synth

    root = tmp_path_factory.mktemp("small_drops")
    synth.make_drop(root, DROP_DATE, 8, width=512, height=3000, seed=7)
    return root


@pytest.fixture(scope="session")
def airflow_home() -> Path:
    """A migrated SQLite metadata DB for dag.test()."""
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True,
                   stdout=subprocess.DEVNULL, timeout=600)
    return AIRFLOW_HOME


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> Iterator[str]:
    """A results DB URL, once a SQLite file (in folders that do not exist yet: the store makes
    them) and once a fresh schema of the session's PostgreSQL database (``pg_url``, which the
    test module imports from tests/pg.py)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'not' / 'yet' / 'results.sqlite'}"
        return
    from .pg import schema_url

    with schema_url(request.getfixturevalue("pg_url")) as url:
        yield url
