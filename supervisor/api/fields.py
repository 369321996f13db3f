"""Reading and validating request bodies: one set of checks for every API family.

Each raises BadRequest naming the field (`param`), so OpenAI clients see it in
`error.param` and every family gets the same wording for the same mistake.
"""

from __future__ import annotations

from typing import Any

from corral.runner.protocol import (
    TOOL_CHOICE_REQUIRED,
    BodyError,
    OptionError,
    json_object,
    options_to_wire,
    parse_options,
)
from corral.supervisor.config import parse_keep_alive
from corral.supervisor.errors import BadRequest
from starlette.requests import Request


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object; BadRequest for anything else.

    The body size is bounded by the app's BodyLimitMiddleware (PayloadTooLarge while reading).
    """
    try:
        return json_object(await request.body())
    except BodyError as e:
        raise BadRequest(str(e)) from None


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


def optional_str_field(body: dict[str, Any], key: str) -> str | None:
    """A string field, or None when it is absent or null."""
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"'{key}' must be a string", param=key)
    return value


def str_field(body: dict[str, Any], key: str, default: str = "") -> str:
    value = optional_str_field(body, key)
    return default if value is None else value


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


def wire_options(raw: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
    """Validate Ollama-named options into runner wire options; `params` maps an option
    back to the request field it came from, so a 400 names the field the client sent."""
    try:
        return options_to_wire(parse_options(raw))
    except OptionError as e:
        message = str(e)
        for opt, param in params.items():
            if f"'{opt}'" in message:
                raise BadRequest(message.replace(f"option '{opt}'", f"'{param}'"), param=param) from None
        raise BadRequest(message) from None


def format_field(value: Any, param: str = "format") -> str | dict[str, Any] | None:
    """A structured-output request as the runner's `format`: "json" or a JSON schema
    object (None or "" for free text). The runner refuses schemas it cannot enforce."""
    if value is None or value == "":
        return None
    if value == "json" or isinstance(value, dict):
        return value
    raise BadRequest(f"'{param}' must be \"json\" or a JSON schema object", param=param)


def forced_tool(tools: list[dict[str, Any]] | None, name: str | None, param: str) -> str:
    """The runner's tool_choice for a forced call: "required" (name None) or a tool's
    name, which must be one of `tools`; a forced call without tools is a 400."""
    if not tools:
        raise BadRequest(f"'{param}' requires a tool call but no tools were given", param=param)
    if name is None:
        return TOOL_CHOICE_REQUIRED
    names = [str((t.get("function") or {}).get("name")) for t in tools]
    if name not in names:
        raise BadRequest(f"'{param}' names {name!r}, which is not among the tools "
                         f"({', '.join(names)})", param=param)
    return name
