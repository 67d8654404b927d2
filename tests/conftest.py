"""Shared fixtures: the shipped demo model, synthetic drops, a loaded model per session."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

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
DROP_DATE = dt.date(2026, 11, 20)


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
