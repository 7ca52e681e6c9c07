"""Checked access to a request's JSON: a wrong type is a 400 naming the field, never a traceback."""

from __future__ import annotations

from typing import Any

from cascade_local.server.chat import ApiError

_NAMES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array",
          dict: "an object"}


def get(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None, *,
        where: str = "") -> Any:
    """body[key] if present and not null, checked against `kind` (bool is never a number here)."""
    value = body.get(key)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    accepted = (*kinds, int) if float in kinds else kinds  # JSON has one number type
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, accepted):
        wanted = " or ".join(_NAMES.get(k, k.__name__) for k in kinds)
        raise ApiError(400, f"'{where}{key}' must be {wanted}", param=f"{where}{key}")
    return float(value) if kinds == (float,) and isinstance(value, int | float) else value


def number_in(body: dict[str, Any], key: str, low: float, high: float, *, integer: bool = False) -> Any:
    value = get(body, key, int if integer else float)
    if value is not None and not low <= value <= high:
        raise ApiError(400, f"'{key}' must be between {low:g} and {high:g}", param=key)
    return value


def text_of(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (other kinds of part are refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"'{where}' must be a string or an array of text parts", param=where)
    parts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ApiError(400, f"'{where}' has a part of type {kind!r}; this model reads text only", param=where)
        parts.append(part["text"])
    return "".join(parts)
