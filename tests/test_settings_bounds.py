"""Every bounded setting is accepted or refused alike whichever way it comes: the trigger form
and REST (the DAG's Param schema, validated as Airflow does), the settings validator, the CLI's
flags and the ``IMAGE_ETL_*`` defaults; a refusal names the parameter. Edges: just inside and
just outside each bound, as a number and as text, and as ``HxW`` for a size."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from image_etl.errors import SettingsError
from image_etl.settings import SETTINGS, check, env_defaults

from .conftest import ROOT

BOUNDED = [s for s in SETTINGS.values() if s.minimum is not None and s.maximum is not None]
OFF_AT_ZERO = {"slice_size"}  # sizes for which 0 means off


def _edges(name: str) -> list[tuple[Any, bool]]:
    """(value, accepted) just inside and just outside each bound."""
    spec = SETTINGS[name]
    lo, hi = spec.minimum, spec.maximum
    assert lo is not None and hi is not None
    step = 1 if spec.kind is int else 0.001
    cases = [(lo, True), (hi, True), (round(lo - step, 6), False), (round(hi + step, 6), False)]
    if spec.sizes:
        lo, hi = int(lo), int(hi)
        cases += [(f"{lo}x{hi}", True), (f"{hi}x{lo}", True), (f"{lo - 1}x{hi}", False),
                  (f"{lo}x{hi + 1}", False), (f"{hi + 1}x{hi + 1}", False),
                  (12000, True), ("12000x2048", True), ("2048x12000", True), (1, False),
                  ("1x2", False), ("1x1", False)]
        if name in OFF_AT_ZERO:
            cases += [(0, True), ("0", True)]
    return cases


CASES = [pytest.param(s.name, v, ok, id=f"{s.name}={v}") for s in BOUNDED for v, ok in _edges(s.name)]


@pytest.fixture(scope="module")
def server_dag(airflow_home):
    """The DAG as the API server holds it: parsed, serialized and read back. A trigger's conf
    (the form's or a REST client's) is validated against these params (``create_dagrun``)."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    dag = DagBag(dag_folder=str(ROOT / "dags")).get_dag("nightly_detections")
    return DagSerialization.from_dict(DagSerialization.to_dict(dag))


def _by_validator(name: str, value: Any) -> str | None:
    try:
        check(name, value)
    except SettingsError as exc:
        assert exc.name == name, exc
        return str(exc)
    return None


def _by_schema(server_dag, name: str, value: Any) -> str | None:
    """As the API server checks a trigger's conf: the DAG's params with it merged, validated."""
    from airflow.sdk.exceptions import ParamValidationError

    try:
        server_dag.params.deep_merge({name: value}).validate()
    except ParamValidationError as exc:
        assert f"param {name}:" in str(exc), exc
        return str(exc)
    return None


def _by_cli(flag: str, name: str, value: Any) -> str | None:
    from image_etl import cli

    args = cli.build_parser().parse_args(["infer", "/nowhere", "--out", "/nowhere", flag, str(value)])
    try:
        cli.infer_settings(args)
    except SettingsError as exc:
        assert exc.name == name, exc
        return str(exc)
    return None


def _by_env(variable: str, name: str, value: Any) -> str | None:
    try:
        env_defaults({variable: str(value)})
    except SettingsError as exc:
        assert exc.name == name and f"(from {variable})" in str(exc), exc
        return str(exc)
    return None


@pytest.mark.parametrize(("name", "value", "accepted"), CASES)
def test_every_path_accepts_or_refuses_alike(server_dag, name, value, accepted):
    spec = SETTINGS[name]
    outcomes = {"validator": _by_validator(name, value),
                "validator (text)": _by_validator(name, str(value))}
    if spec.section:
        outcomes["form/REST schema"] = _by_schema(server_dag, name, value)
    if spec.cli:
        outcomes[f"CLI {spec.cli}"] = _by_cli(spec.cli, name, value)
    if spec.env:
        outcomes[f"env {spec.env}"] = _by_env(spec.env, name, value)
    wrong = {path: error for path, error in outcomes.items() if (error is None) != accepted}
    assert not wrong, f"expected {'accepted' if accepted else 'refused'} by every path: {wrong}"
    for path, error in outcomes.items():  # Airflow says "Invalid input for param NAME: ..."
        named = f"param {name}:" if path == "form/REST schema" else f"invalid parameter {name}:"
        assert error is None or named in error, (path, error)


def test_every_dag_param_with_bounds_is_in_the_table():
    """The table above covers every number and size the trigger form offers."""
    numeric = {s.name for s in SETTINGS.values() if s.kind in (int, float)}
    assert numeric - {s.name for s in BOUNDED} == set()
    assert {s.name for s in SETTINGS.values() if s.zero_is_off} == OFF_AT_ZERO


@pytest.mark.parametrize("name", [s.name for s in BOUNDED if s.sizes])
def test_size_schema_and_validator_agree_on_every_side(name):
    """Sides around both bounds and across the range, as a number, as text and in HxW text:
    the JSON schema (its pattern and number bounds) and the validator accept exactly alike."""
    import jsonschema

    schema = {k: v for k, v in SETTINGS[name].json_schema().items()
              if k not in ("title", "description", "section")}
    validator = jsonschema.Draft202012Validator(schema)
    top = int(SETTINGS[name].maximum)
    for side in sorted({*range(0, 1100), *range(top - 1100, top + 1100), *range(0, top, 37)}):
        for value in (side, str(side), f"{side}x640", f"640 X {side}"):
            by_schema = validator.is_valid(value)
            assert by_schema == (_by_validator(name, value) is None), (value, by_schema)


# --- the work a setting can cause: slices per image --------------------------------------------

def test_slice_count_is_the_grid_slicing_makes():
    from image_etl.sizes import slice_count
    from image_etl.slicing import slice_grid

    cases = [((12000, 2048), (32, 32), 0.2), ((12000, 2048), (640, 480), 0.5)]
    cases += [(hw, slice_hw, overlap) for hw in ((3000, 512), (640, 640), (100, 50))
              for slice_hw in ((32, 32), (320, 320), (640, 480), (33, 47), (20000, 20000))
              for overlap in (0, 0.2, 0.5, 0.9)]
    for hw, slice_hw, overlap in cases:
        assert slice_count(*hw, slice_hw, overlap) == len(slice_grid(*hw, slice_hw, overlap))


def test_slices_per_image_are_capped_in_every_path(tmp_path):
    """The smallest slice at the default overlap is the cap (accepted); the same slice at more
    overlap makes more slices than the cap: refused naming slice_size and the cap, by the
    settings (the DAG's discover), the CLI (exit 2, before any image) and the env defaults."""
    from image_etl import cli
    from image_etl.run_settings import RunSettings
    from image_etl.settings import MAX_SLICES_PER_IMAGE, InferSettings
    from image_etl.slicing import slice_grid

    assert MAX_SLICES_PER_IMAGE == len(slice_grid(12000, 2048, (32, 32), 0.2))
    InferSettings(slice_size=32, slice_overlap=0.2)
    env_defaults({"IMAGE_ETL_SLICE_SIZE": "32"})
    too_many = re.escape("invalid parameter slice_size: 32 with slice_overlap 0.5 makes 95,123 "
                         "slices of a 2048 x 12000 image, more than MAX_SLICES_PER_IMAGE (36,498)")
    with pytest.raises(SettingsError, match=too_many):
        InferSettings(slice_size=32, slice_overlap=0.5)
    model = tmp_path / "m.pt"
    model.write_bytes(b"weights")
    with pytest.raises(SettingsError, match=too_many):
        RunSettings.from_params({"slice_size": "32x32", "slice_overlap": 0.5, "model_path": str(model),
                                 "drop_dir": str(tmp_path), "output_dir": str(tmp_path)},
                                dt.date(2026, 11, 20))
    with pytest.raises(SettingsError, match=too_many):
        env_defaults({"IMAGE_ETL_SLICE_SIZE": "32", "IMAGE_ETL_SLICE_OVERLAP": "0.5"})
    args = cli.build_parser().parse_args(["infer", "/nowhere", "--out", "/nowhere", "--slice-size",
                                          "32", "--slice-overlap", "0.5"])
    with pytest.raises(SettingsError, match=too_many):
        cli.infer_settings(args)


def test_cli_refuses_a_tiny_slice_before_any_work(tmp_path):
    """The issue's example, end to end: exit status 2 and the message, no output written."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "image_etl", "infer", str(tmp_path), "--out", str(out),
                           "--slice-size", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("error: invalid parameter slice_size: must be 0 (off) or "
                                   "between 32 and 16384, got 1")
    assert not out.exists()


# --- the README's table is the declaration ----------------------------------------------------------

def readme_settings() -> dict[str, dict[str, str]]:
    """The README's settings table: name → its cells (backticks removed)."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip().replace("`", "") for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and line.startswith("| `"):
            rows[cells[0]] = dict(zip(("section", "cli", "env", "default", "allowed"), cells[1:]))
    return rows


def documented_default(spec) -> str:
    from image_etl.settings import PROJECT_ROOT

    if spec.name == "model_path":
        return str(Path(spec.default).relative_to(PROJECT_ROOT))
    if spec.default is None:
        return "empty"
    return str(spec.default).lower() if spec.kind is bool else str(spec.default)


def test_readme_lists_every_setting_as_declared():
    rows = readme_settings()
    assert list(rows) == list(SETTINGS)
    for name, spec in SETTINGS.items():
        row = rows[name]
        assert row["section"] == (spec.section or "engine only"), name
        assert (row["cli"], row["env"]) == (spec.cli or "", spec.env or ""), name
        assert row["default"] == documented_default(spec), name
        assert spec.bounds_text() in row["allowed"], name
