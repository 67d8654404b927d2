"""One parameter's declaration (``Setting``) and what is derived from it alone: its value type
for msgspec, which converts and validates; its JSON schema, which Airflow's ``Param`` checks
in the trigger form and over REST; the text of its bounds (CLI help, README); and the
``invalid parameter NAME: ...`` messages.

msgspec does the checking. Ours is only what it cannot know: the input forms (text from the
environment, flags and forms: ``" 4 "``, ``"yes"``, ``"640x480"``) and the messages, which name
the parameter first and say the bound in the declaration's words. The table of settings is in
``image_etl.settings``. Light enough for a DAG file: standard library and msgspec only.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from image_etl.errors import SettingsError
from image_etl.storage.location import ObjectLocation

_SIZE_TEXT = re.compile(r"\s*(\d+)(?:\s*[xX]\s*(\d+))?\s*")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}
_EXPECTED = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One parameter. ``section`` non-empty: a DAG param shown in that form section.
    ``env``: the variable a deployment sets its default with. ``cli``: the ``infer`` flag."""

    name: str
    kind: type  # bool, int, float, str
    default: Any
    title: str
    description: str = ""
    section: str = ""
    env: str | None = None
    cli: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    multiple_of: int | None = None
    enum: tuple[str, ...] = ()
    pattern: str | None = None
    pattern_hint: str = ""  # what a value refused by ``pattern`` should look like
    nullable: bool = False
    format: str | None = None  # JSON-schema format of a string ("date")
    sizes: bool = False  # a number N (= NxN), or text "HxW": each side within the bounds
    zero_is_off: bool = False  # a size: 0 also allowed, meaning off

    def __post_init__(self) -> None:
        # A size's sides are bounded alike in both forms; they are rounded to the model's
        # stride where they are used, so a size has no multiple_of.
        if self.sizes and (self.minimum is None or self.maximum is None or self.multiple_of):
            raise ValueError(f"size setting {self.name}: declare minimum and maximum, "
                             "no multiple_of")

    # --- derived: the library's type, the JSON schema ------------------------------------------

    def value_type(self) -> Any:
        """The msgspec type of a (non-null) value: the kind, with the declared bounds."""
        if self.enum:
            return Literal[self.enum]
        if self.kind is str:
            text = msgspec.Meta(pattern=None if self.sizes else self.pattern,
                                min_length=None if self.nullable else 1)
            return Annotated[str, text]
        number = msgspec.Meta(ge=self.minimum, le=self.maximum, multiple_of=self.multiple_of)
        return Annotated[self.kind, number]

    def json_schema(self) -> dict[str, Any]:
        """The Airflow Param keywords (JSON schema + form title, description, section)."""
        schema: dict[str, Any] = msgspec.json.schema(self.value_type())
        if self.enum:
            schema["enum"] = list(self.enum)  # the declared order (msgspec sorts them)
        kinds = [_JSON_TYPES[self.kind], "string"] if self.sizes else [_JSON_TYPES[self.kind]]
        schema["type"] = ["null", *kinds] if self.nullable else (kinds if self.sizes else kinds[0])
        if self.sizes:
            schema["pattern"] = self.size_pattern()
            if self.zero_is_off:  # 0, or minimum..maximum
                schema["minimum"] = 0
                schema["not"] = {"type": "integer", "exclusiveMinimum": 0,
                                 "exclusiveMaximum": self.minimum}
        if self.format:
            schema["format"] = self.format
        schema["title"] = self.title
        if self.description:
            schema["description"] = self.description
        schema["section"] = self.section
        return schema

    def size_pattern(self) -> str:
        """The JSON-schema pattern of a size given as text: N or HxW, each side within the
        bounds (so the form and REST refuse exactly what ``check`` refuses)."""
        assert self.minimum is not None and self.maximum is not None
        side = _int_pattern(int(self.minimum), int(self.maximum))
        size = f"{side}(?:\\s*[xX]\\s*{side})?"
        if self.zero_is_off:
            size = f"0(?:\\s*[xX]\\s*0)?|{size}"
        return rf"^(?:\s*(?:{size})\s*){'?' if self.nullable else ''}$"

    def bounds_text(self) -> str:
        """The allowed values in words (CLI help, README)."""
        if self.enum:
            return ", ".join(self.enum)
        if self.minimum is None or self.maximum is None:
            return ""
        text = f"{self.minimum} to {self.maximum}"
        if self.multiple_of:
            text += f", a multiple of {self.multiple_of}"
        if self.sizes:
            text = f"N or HEIGHTxWIDTH, each side {text}"
        if self.zero_is_off:
            text = f"0 (off), or {text}"
        return text + (", or empty" if self.nullable else "")

    # --- validation --------------------------------------------------------------------------

    def check(self, value: Any) -> Any:
        """``value`` (from a form, conf, env or flag: text is converted) as this setting wants
        it, or SettingsError naming it."""
        if value is None or (value == "" and self.nullable):
            if self.nullable:
                return None
            raise SettingsError(self.name, f"expected {_EXPECTED[self.kind]}, got {value!r}")
        if self.sizes:
            return check_size(self, value)
        if self.kind is bool:
            return self._flag(value)
        if self.kind is str and not isinstance(value, str):
            raise SettingsError(self.name, f"expected text, got {value!r}")
        given = value.strip() if self.kind is not str and isinstance(value, str) else value
        try:
            checked = msgspec.convert(given, self.value_type(), strict=False)
        except msgspec.ValidationError as exc:
            raise SettingsError(self.name, self._problem(value, str(exc))) from None
        if self.kind is str and not self.nullable and not checked.strip():
            raise SettingsError(self.name, "must not be empty")
        return checked

    def _problem(self, value: Any, error: str) -> str:
        """msgspec's complaint in the declaration's words."""
        if self.enum:
            return f"expected one of {', '.join(self.enum)}, got {value!r}"
        if "matching regex" in error:
            return f"{value!r} is not valid: {self.pattern_hint}"
        if "length >=" in error:
            return f"{value!r} is not valid: {self.pattern_hint}" if self.pattern else \
                "must not be empty"
        if self.kind is int and isinstance(value, float) and not isinstance(value, bool):
            if value == value and value != int(value):
                return f"expected a whole number, got {value!r}"
        if "multiple of" in error:
            return f"must be a multiple of {self.multiple_of}, got {_number(value, self.kind)}"
        if ">=" in error or "<=" in error:
            if _number(value, float) != _number(value, float):  # NaN
                return f"expected a number, got {value!r}"
            off = "0 (off) or " if self.zero_is_off else ""
            return f"must be {off}between {self.minimum} and {self.maximum}, got {value!r}"
        return f"expected a {self.kind.__name__}, got {value!r}"

    def _flag(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        text = value.strip().lower() if isinstance(value, str) else None
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise SettingsError(self.name, f"expected true or false, got {value!r}")


def _number(value: Any, kind: type) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError):
        return value


# --- sizes: a number or HEIGHTxWIDTH --------------------------------------------------------------

def check_size(spec: Setting, value: Any) -> int | str:
    """A size: N (the same as NxN) or ``"HxW"``, each side within the setting's bounds (0
    alone: off, where allowed); kept as the number, or as the text ``"HxW"`` when the sides
    differ."""
    if not isinstance(value, str):
        return _check_number(spec, value)
    match = _SIZE_TEXT.fullmatch(value)
    if match is None:
        raise SettingsError(spec.name, f"{value!r} is not valid: {spec.pattern_hint}")
    h, w = int(match[1]), int(match[2] or match[1])
    if h == w:
        number = _check_number(spec, h)
    else:
        for side in (h, w):
            if not (spec.minimum or 0) <= side <= (spec.maximum or side):
                raise SettingsError(spec.name, f"each side must be between {spec.minimum} and "
                                    f"{spec.maximum}, got {value!r}")
        number = None
    if not re.fullmatch(spec.size_pattern(), value):  # a leading zero, say: as the form would
        raise SettingsError(spec.name, f"{value!r} is not valid: {spec.pattern_hint}")
    return number if number is not None else f"{h}x{w}"


def _check_number(spec: Setting, value: Any) -> Any:
    if isinstance(value, bool):
        raise SettingsError(spec.name, f"expected a {spec.kind.__name__}, got {value!r}")
    if spec.zero_is_off and value == 0:
        return 0
    try:
        return msgspec.convert(value, spec.value_type(), strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(spec.name, spec._problem(value, str(exc))) from None


def _int_pattern(lo: int, hi: int) -> str:
    """A regex alternation matching the decimal numbers lo..hi (no leading zeros)."""
    parts: list[str] = []
    for digits in range(len(str(lo)), len(str(hi)) + 1):
        first = max(lo, 10 ** (digits - 1) if digits > 1 else 0)
        parts += _digit_ranges(str(first), str(min(hi, 10 ** digits - 1)))
    return "(?:" + "|".join(parts) + ")"


def _digit_ranges(lo: str, hi: str) -> list[str]:
    """Regexes for the numbers lo..hi written with the same number of digits."""
    if lo == hi:
        return [lo]
    if len(lo) == 1:
        return [f"[{lo}-{hi}]"]
    rest = len(lo) - 1
    any_rest = r"\d" if rest == 1 else rf"\d{{{rest}}}"
    if lo == "0" * len(lo) and hi == "9" * len(hi):
        return [rf"\d{{{len(lo)}}}"]
    if lo[0] == hi[0]:
        return [lo[0] + p for p in _digit_ranges(lo[1:], hi[1:])]
    parts = [lo[0] + p for p in _digit_ranges(lo[1:], "9" * rest)]
    if int(hi[0]) - int(lo[0]) > 1:
        parts.append(f"[{int(lo[0]) + 1}-{int(hi[0]) - 1}]" + any_rest)
    return parts + [hi[0] + p for p in _digit_ranges("0" * rest, hi[1:])]


# --- paths ---------------------------------------------------------------------------------------

def absolute_path(name: str, value: Any, allowed_roots: tuple[Path | ObjectLocation, ...] = ()) -> Path:
    """A parameter that must be an absolute path (under one of ``allowed_roots`` if given)."""
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise SettingsError(name, f"expected an absolute path, got {value!r}")
    path = Path(str(value).strip())
    if not path.is_absolute():
        raise SettingsError(name, f"must be an absolute path, got {str(path)!r}")
    resolved = Path(*path.parts)  # normalise separators without touching the filesystem
    if ".." in resolved.parts:
        raise SettingsError(name, f"must not contain '..', got {str(path)!r}")
    if allowed_roots and not any(resolved.is_relative_to(root) for root in allowed_roots
                                 if isinstance(root, Path)):
        roots = ", ".join(str(r) for r in allowed_roots)
        raise SettingsError(name, f"{str(path)!r} is not under an allowed root ({roots})")
    return resolved
