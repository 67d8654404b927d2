"""Weights are code: only the deployment chooses where they come from, and a checkpoint whose
pickle would run something is refused before it runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from image_etl import stages, synth
from image_etl.errors import ModelLoadError, SettingsError
from image_etl.weights import confine_model_path, model_roots

from .conftest import DEMO_MODEL, DROP_DATE, ROOT

RUN_ID = "manual__weights"


@pytest.fixture(scope="module")
def drop(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights_drop")
    synth.make_drop(root, DROP_DATE, 2, width=320, height=640, seed=2020)
    return root


def _params(drop, out, model) -> dict:
    return {"drop_dir": str(drop / "{date}"), "output_dir": str(out), "model_path": str(model),
            "devices": "cpu", "settle_seconds": 0}


def test_model_roots_default_to_the_deployment_models_folder(tmp_path):
    deployed = tmp_path / "models" / "best.pt"
    assert model_roots(DEMO_MODEL, {"IMAGE_ETL_MODEL": str(deployed)}) == ((tmp_path / "models").resolve(),)
    assert model_roots(DEMO_MODEL, {}) == (DEMO_MODEL.parent.resolve(),)
    listed = {"IMAGE_ETL_MODEL_ROOTS": os.pathsep.join(["/srv/a", "/srv/b"]),
              "IMAGE_ETL_MODEL": str(deployed)}
    assert model_roots(DEMO_MODEL, listed) == (Path("/srv/a"), Path("/srv/b"))
    with pytest.raises(SettingsError, match="invalid parameter model_path: IMAGE_ETL_MODEL_ROOTS"):
        model_roots(DEMO_MODEL, {"IMAGE_ETL_MODEL_ROOTS": "models"})
    # Without IMAGE_ETL_MODEL_ROOTS the deployment's model folder is the one root.
    env = {"IMAGE_ETL_MODEL": str(deployed)}
    confine_model_path(tmp_path / "models" / "other.pt", DEMO_MODEL, env)
    with pytest.raises(SettingsError, match="invalid parameter model_path: .* not under a model root"):
        confine_model_path(tmp_path / "drops" / "planted.pt", DEMO_MODEL, env)


def test_model_path_outside_the_model_roots_is_refused_in_discover(drop, tmp_path, monkeypatch):
    models, uploads, out = tmp_path / "models", tmp_path / "uploads", tmp_path / "out"
    models.mkdir()
    uploads.mkdir()
    planted = uploads / "planted.pt"
    shutil.copyfile(DEMO_MODEL, planted)
    shutil.copyfile(DEMO_MODEL, models / "best.pt")
    (models / "link.pt").symlink_to(planted)  # inside the root by name, outside once resolved
    monkeypatch.setenv("IMAGE_ETL_MODEL_ROOTS", str(models))
    # The drop roots do not let weights in: they are where uploaders write.
    monkeypatch.setenv("IMAGE_ETL_ALLOWED_ROOTS", f"{uploads}:{drop}:{out}")
    for bad in (planted, models / "link.pt", models / ".." / "uploads" / "planted.pt"):
        with pytest.raises(SettingsError) as info:
            stages.discover(_params(drop, out, bad), run_id=RUN_ID, run_date=DROP_DATE,
                            db_url=None)
        assert str(info.value).startswith("invalid parameter model_path: "), info.value
        assert "\n" not in str(info.value)
        assert not out.exists(), "refused before any work"
    found = stages.discover(_params(drop, out, models / "best.pt"), run_id=RUN_ID,
                            run_date=DROP_DATE, db_url=None)
    assert found["images"] == 2


def test_a_planted_model_path_fails_the_dag_run_before_any_work(airflow_home, drop, tmp_path,
                                                                 monkeypatch, capfd):
    """What the trigger form and the REST API lead to: the run's discover refuses the param."""
    import datetime as dt

    from airflow.dag_processing.dagbag import DagBag

    uploads, out = tmp_path / "uploads", tmp_path / "out"
    uploads.mkdir()
    planted = uploads / "model.pt"
    shutil.copyfile(DEMO_MODEL, planted)
    monkeypatch.setenv("IMAGE_ETL_MODEL_ROOTS", str(DEMO_MODEL.parent))
    monkeypatch.setenv("IMAGE_ETL_DB_URL", f"sqlite:///{tmp_path / 'results.db'}")
    dag = DagBag(dag_folder=str(ROOT / "dags")).get_dag("nightly_detections")
    run = dag.test(logical_date=dt.datetime(2026, 11, 20, 2, tzinfo=dt.UTC),
                   run_conf=_params(drop, out, planted))
    assert run.state == "failed"
    assert "invalid parameter model_path: " in capfd.readouterr().out
    assert not out.exists() and not (tmp_path / "results.db").exists()


MAKE_EVIL = """
import os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
torch.save({"model": Payload(), "train_args": {}}, sys.argv[1])
"""


@pytest.fixture
def evil_weights(tmp_path):
    """A well-formed torch checkpoint whose unpickling would run a command (touch a marker)."""
    path, marker = tmp_path / "models" / "evil.pt", tmp_path / "MARKER"
    path.parent.mkdir()
    subprocess.run([sys.executable, "-c", MAKE_EVIL, str(path), str(marker)], check=True,
                   timeout=120)
    assert not marker.exists()
    return path, marker


def test_a_checkpoint_that_would_run_a_command_is_refused_and_nothing_runs(evil_weights,
                                                                            monkeypatch):
    from image_etl.model import load_model

    monkeypatch.delenv("IMAGE_ETL_UNSAFE_WEIGHTS", raising=False)
    path, marker = evil_weights
    with pytest.raises(ModelLoadError) as info:
        load_model(path, "cpu", runtime="torch")
    message = str(info.value)
    assert not marker.exists(), "the pickle's command ran"
    assert message.startswith(f"model weights {path} refused by allow-listed loading")
    assert "posix.system" in message and "IMAGE_ETL_UNSAFE_WEIGHTS" in message
    assert "\n" not in message


def test_the_shipped_model_loads_allow_listed_with_the_openvino_copy(monkeypatch):
    from ultralytics.nn import tasks

    from image_etl.model import load_model

    monkeypatch.delenv("IMAGE_ETL_UNSAFE_WEIGHTS", raising=False)
    model = load_model(DEMO_MODEL, "cpu", runtime="torch", warmup=False)
    assert tasks.SAFE_LOAD is True and model.names
    pytest.importorskip("openvino", reason="the OpenVINO runtime is an optional worker package")
    ov = load_model(DEMO_MODEL, "cpu", runtime="openvino", warmup=False)
    assert ov.runtime == "openvino" and ov.names == model.names


def test_the_operator_opt_out_really_unpickles(evil_weights, monkeypatch):
    """IMAGE_ETL_UNSAFE_WEIGHTS=1 means what the README says: code in the file runs."""
    from image_etl.model import load_model

    path, marker = evil_weights
    monkeypatch.setenv("IMAGE_ETL_UNSAFE_WEIGHTS", "1")
    try:
        with pytest.raises(ModelLoadError, match=f"cannot load model weights {path}"):
            load_model(path, "cpu", runtime="torch")
    finally:
        from image_etl.model import use_safe_loading

        use_safe_loading(True)
    assert marker.exists()
