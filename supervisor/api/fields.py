"""Validating request-body fields: one set of checks for every API family.

Each raises BadRequest naming the field (`param`), so OpenAI clients see it in
`error.param` and every family gets the same wording for the same mistake.
"""

from __future__ import annotations

from typing import Any

from corral.supervisor.config import parse_keep_alive
from corral.supervisor.errors import BadRequest


def model_field(body: dict[str, Any], *keys: str) -> str:
    """The model name from the first of `keys` present (default "model"); required."""
    keys = keys or ("model",)
    for key in keys:
        value = body.get(key)
        if value is not None:
            if not isinstance(value, str) or not value.strip():
                raise BadRequest(f"'{key}' must be a non-empty string", param=key)
            return value.strip()
    raise BadRequest(f"'{keys[0]}' is required", param=keys[0])


def str_field(body: dict[str, Any], key: str, default: str = "") -> str:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise BadRequest(f"'{key}' must be a string", param=key)
    return value


def bool_field(body: dict[str, Any], key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"'{key}' must be true or false", param=key)
    return value


def keep_alive_field(body: dict[str, Any]) -> float | None:
    """Seconds (< 0 forever), or None for the server's default."""
    raw = body.get("keep_alive")
    return None if raw is None else parse_keep_alive(raw)
