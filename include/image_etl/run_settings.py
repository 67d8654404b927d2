"""A whole run's settings: what the DAG's params (or the CLI) ask for, with the drop date, the
folders (templates filled) and the model resolved (image_etl.settings holds the declaration)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from image_etl.errors import SettingsError
from image_etl.settings import DAG_PARAMS, SETTINGS, InferSettings, absolute_path, check, storage_location
from image_etl.storage.location import ObjectLocation, location_text
from image_etl.weights import confine_model_path


def model_folder_name(model_path: Path, sha256: str) -> str:
    """``{model}`` in templates: the weights' file name and a short hash of their content, so
    two different ``best.pt`` files never share an output folder."""
    return f"{model_path.stem}-{sha256[:8]}"


def _fill(template: str, drop_date: dt.date, model: Callable[[], str]) -> str:
    # Plain replacement, not str.format: a path may legitimately contain other braces.
    text = template.replace("{date}", drop_date.isoformat())
    return text.replace("{model}", model()) if "{model}" in text else text


def drop_date_for(params: Mapping[str, Any], run_date: dt.date) -> dt.date:
    """The drop date: the ``date`` param if given, else the run's date plus the offset."""
    raw = check("date", params.get("date"))
    if raw is not None:
        try:
            return dt.date.fromisoformat(raw.strip())
        except ValueError:
            raise SettingsError("date", f"expected YYYY-MM-DD or empty, got {raw!r}") from None
    offset = check("drop_date_offset_days", params.get("drop_date_offset_days", 0))
    return run_date + dt.timedelta(days=offset)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    drop_date: dt.date
    drop_dir: Path | ObjectLocation
    output_dir: Path | ObjectLocation
    model_path: Path
    devices: str
    infer: InferSettings
    reprocess: bool = False
    settle_seconds: float = SETTINGS["settle_seconds"].default
    max_failed_fraction: float = SETTINGS["max_failed_fraction"].default
    timeout_per_image_s: float = SETTINGS["timeout_per_image_s"].default
    drop_date_offset_days: int = 0
    catchup_nights: int = SETTINGS["catchup_nights"].default
    drop_ready_marker: str | None = SETTINGS["drop_ready_marker"].default
    drop_wait_timeout: float = SETTINGS["drop_wait_timeout"].default
    drop_wait_on_timeout: str = SETTINGS["drop_wait_on_timeout"].default

    @classmethod
    def from_params(cls, params: Mapping[str, Any], run_date: dt.date,
                    allowed_roots: tuple[Path | ObjectLocation, ...] = (), *, model_sha256: str | None = None,
                    check_files: bool = True) -> RunSettings:
        """Validate DAG params / CLI options; raise SettingsError naming the first bad one.

        ``check_files`` False: the params were resolved by an earlier stage (``to_dict``); the
        model file is not looked at (load and report need none). ``model_sha256`` saves
        hashing the weights again for ``{model}``.
        """
        unknown = sorted(set(params) - set(DAG_PARAMS))
        if unknown:
            raise SettingsError(unknown[0], f"unknown parameter (known: {', '.join(sorted(DAG_PARAMS))})")
        given = dict(params)
        if isinstance(given.get("devices"), (list, tuple)):
            given["devices"] = ",".join(str(d) for d in given["devices"])
        values = {name: check(name, given.get(name, SETTINGS[name].default))
                  for name in DAG_PARAMS if name != "date"}
        drop_date = drop_date_for(params, run_date)
        model_path = confine_model_path(absolute_path("model_path", values["model_path"]),
                                        SETTINGS["model_path"].default)
        if check_files and not model_path.is_file():
            raise SettingsError("model_path", f"no such file: {model_path}")
        if model_path.suffix != ".pt":
            raise SettingsError("model_path", f"expected an Ultralytics .pt file, got {model_path.name}")

        def model_name() -> str:
            from image_etl.weights import weights_sha256  # only when a template asks for it

            return model_folder_name(model_path, model_sha256 or weights_sha256(model_path))

        paths = {name: storage_location(name, _fill(values[name], drop_date, model_name),
                                        allowed_roots) for name in ("drop_dir", "output_dir")}
        return cls(drop_date=drop_date, model_path=model_path, devices=values["devices"],
                   infer=InferSettings.from_params(values), drop_dir=paths["drop_dir"],
                   output_dir=paths["output_dir"], reprocess=values["reprocess"],
                   settle_seconds=values["settle_seconds"],
                   max_failed_fraction=values["max_failed_fraction"],
                   timeout_per_image_s=values["timeout_per_image_s"],
                   drop_date_offset_days=values["drop_date_offset_days"],
                   catchup_nights=values["catchup_nights"],
                   drop_ready_marker=values["drop_ready_marker"],
                   drop_wait_timeout=values["drop_wait_timeout"],
                   drop_wait_on_timeout=values["drop_wait_on_timeout"])

    @classmethod
    def resolved(cls, params: Mapping[str, Any]) -> RunSettings:
        """Settings an earlier stage resolved (``to_dict``): checked again, files not touched."""
        return cls.from_params(params, dt.date.fromisoformat(params["date"]), check_files=False)

    def to_dict(self) -> dict[str, Any]:
        """The run's params, resolved: the drop date, no templates (XCom- and JSON-sized)."""
        infer = self.infer.to_dict()
        values = {"date": self.drop_date.isoformat(),
                  "drop_dir": location_text(self.drop_dir),
                  "output_dir": location_text(self.output_dir), "model_path": str(self.model_path),
                  "devices": self.devices, "reprocess": self.reprocess,
                  "settle_seconds": self.settle_seconds,
                  "max_failed_fraction": self.max_failed_fraction,
                  "timeout_per_image_s": self.timeout_per_image_s,
                  "drop_date_offset_days": self.drop_date_offset_days,
                  "catchup_nights": self.catchup_nights,
                  "drop_ready_marker": self.drop_ready_marker,
                  "drop_wait_timeout": self.drop_wait_timeout,
                  "drop_wait_on_timeout": self.drop_wait_on_timeout,
                  **{k: v for k, v in infer.items() if k in DAG_PARAMS}}
        return {name: values[name] for name in DAG_PARAMS}
