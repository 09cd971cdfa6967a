"""Configuration errors: `ConfigError` (one line per problem) and pydantic's errors rendered that way."""

from __future__ import annotations

import difflib
import json
import re
import typing
from collections.abc import Iterable, Sequence
from typing import Any

import annotated_types
from pydantic import (
    BaseModel,
    ValidationError,
)

__all__ = ["ConfigError"]


# ---- errors ------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """An invalid configuration; the message has one line per problem: `field = value: what is allowed`."""

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class _Problems(ValueError):
    """Raised inside validators: (path relative to the validated model, value, what is allowed) triples."""

    def __init__(self, problems: Sequence[tuple[str, Any, str]]):
        self.problems = list(problems)
        super().__init__("; ".join(f"{p} = {_show(v)}: {m}" for p, v, m in self.problems))


def _show(value: Any) -> str:
    """A short, readable rendering of an offending value."""
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, bool) or value is None:
        text = {True: "true", False: "false", None: "null"}[value]
    else:
        try:
            text = json.dumps(value, default=str)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _join(loc: Iterable[Any]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


# ---- pydantic errors -> one line per problem ---------------------------------------------------
def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The BaseModel classes inside an annotation (X, list[X], X | None, Annotated[...])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found += _models_in(arg)
    return found


def _walk(root: type[BaseModel], loc: Sequence[Any]) -> tuple[type[BaseModel] | None, Any]:
    """(the model class holding the last key of loc, that field's FieldInfo or None)."""
    model: type[BaseModel] | None = root
    info = None
    keys = [part for part in loc if not isinstance(part, int)]
    for i, part in enumerate(keys):
        if model is None or part not in model.model_fields:
            return model, None
        info = model.model_fields[part]
        if i == len(keys) - 1:
            return model, info
        inner = _models_in(info.annotation)
        model = inner[0] if inner else None
    return model, info


def _num(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _section_model(root: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    """The model class of the section at loc (the root for an empty loc)."""
    if not [part for part in loc if not isinstance(part, int)]:
        return root
    _, info = _walk(root, loc)
    inner = _models_in(getattr(info, "annotation", None))
    return inner[0] if inner else None


def _bounds(info: Any) -> str | None:
    """'in (0, 1]', '>= 1' ... from a field's numeric constraints, or None."""
    lo = hi = None
    for meta in getattr(info, "metadata", []):
        if isinstance(meta, annotated_types.Gt):
            lo = ("(", ">", meta.gt)
        elif isinstance(meta, annotated_types.Ge):
            lo = ("[", ">=", meta.ge)
        elif isinstance(meta, annotated_types.Lt):
            hi = (")", "<", meta.lt)
        elif isinstance(meta, annotated_types.Le):
            hi = ("]", "<=", meta.le)
    if lo and hi:
        return f"in {lo[0]}{_num(lo[2])}, {_num(hi[2])}{hi[0]}"
    if lo or hi:
        bound = lo or hi
        return f"{bound[1]} {_num(bound[2])}"
    return None


def _is_int_field(info: Any) -> bool:
    annotation = getattr(info, "annotation", None)
    return annotation is int or int in typing.get_args(annotation)


_TYPE_TEXT = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping (a section)",
    "model_attributes_type": "must be a mapping (a section)",
    "missing": "is required",
}


def _problems_of(error: ValidationError, root: type[BaseModel]) -> list[str]:
    lines: list[str] = []
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        kind = item["type"]
        value = item.get("input")
        ctx = item.get("ctx") or {}
        inner = ctx.get("error")
        if isinstance(inner, _Problems):
            for path, bad, message in inner.problems:
                lines.append(f"{_join((*loc, *path.split('.')))} = {_show(bad)}: {message}")
            continue
        field = _join(loc) or "config"
        if kind == "extra_forbidden":
            model = _section_model(root, loc[:-1])
            valid = sorted(model.model_fields) if model is not None else []
            section = _join(loc[:-1]) or "the configuration"
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            lines.append(f"{field} = {_show(value)}: unknown key; {hint}valid keys of {section}: {', '.join(valid)}")
            continue
        _, info = _walk(root, loc)
        if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            bounds = _bounds(info)
            if bounds is None:
                allowed = item["msg"].replace("Input should be", "must be")
            else:
                allowed = ("must be an integer " if _is_int_field(info) else "must be ") + bounds
            lines.append(f"{field} = {_show(value)}: {allowed}")
        elif kind == "literal_error":
            lines.append(f"{field} = {_show(value)}: must be one of {ctx.get('expected')}")
        elif kind in _TYPE_TEXT:
            text = _TYPE_TEXT[kind]
            bounds = _bounds(info)
            if bounds and kind != "missing":
                text += f" {bounds}"
            if kind == "finite_number":  # e.g. `.inf` for "no bound": point at the field's null, if it has one
                null = re.search(r"null = [^;)]+", getattr(info, "description", None) or "")
                text += f"; {null.group(0).strip()}" if null else ""
            lines.append(f"{field}: {text}" if kind == "missing" else f"{field} = {_show(value)}: {text}")
        elif kind == "string_pattern_mismatch":
            lines.append(f"{field} = {_show(value)}: must match {ctx.get('pattern')}")
        elif kind == "string_too_short":
            lines.append(f"{field} = {_show(value)}: must not be empty")
        else:
            message = str(inner) if inner is not None else item["msg"]
            message = message.removeprefix("Value error, ")
            lines.append(f"{field} = {_show(value)}: {message}")
    return lines or [str(error)]
