"""Reading an Ollama Modelfile into an /api/create request (what `corral create -f` sends).

Instructions, case-insensitive: FROM, SYSTEM, TEMPLATE, PARAMETER, MESSAGE,
LICENSE, ADAPTER (sent as `adapters`, which the server refuses with a clear
error). A value may be quoted ("...") or span lines in triple quotes
(three double quotes around it); `#` starts a comment line. A relative FROM path is taken from the
Modelfile's directory, as Ollama does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

INSTRUCTIONS = ("from", "system", "template", "parameter", "message", "license", "adapter")


class ModelfileError(ValueError):
    """A Modelfile that cannot be read; the message names the line."""


def _value(text: str, lines: list[str], i: int) -> tuple[str, int]:
    """The instruction's value starting at `text` on line i; (value, index of its last line)."""
    stripped = text.strip()
    if stripped.startswith('"""'):
        rest = stripped[3:]
        if '"""' in rest:
            return rest[: rest.index('"""')], i
        parts = [rest]
        for j in range(i + 1, len(lines)):
            if '"""' in lines[j]:
                parts.append(lines[j][: lines[j].index('"""')])
                return "\n".join(parts), j
            parts.append(lines[j])
        raise ModelfileError(f"line {i + 1}: unterminated \"\"\"")
    if len(stripped) >= 2 and stripped[0] == stripped[-1] == '"':
        return stripped[1:-1], i
    return stripped, i


def parameter_value(text: str) -> Any:
    """A PARAMETER (or REPL `/set parameter`) value: int, float, bool, else the text unquoted."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


def parse_modelfile(text: str, base_dir: Path | None = None) -> dict[str, Any]:
    """The /api/create fields a Modelfile asks for (without "model")."""
    lines = text.splitlines()
    body: dict[str, Any] = {}
    parameters: dict[str, Any] = {}
    messages: list[dict[str, str]] = []
    licenses: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if not line or line.startswith("#"):
            i += 1
            continue
        word, _, rest = line.partition(" ")
        command = word.lower()
        if command not in INSTRUCTIONS:
            raise ModelfileError(f"line {i + 1}: unknown instruction {word!r}")
        if command == "parameter":
            name, _, raw = rest.strip().partition(" ")
            value_text, i = _value(raw, lines, i)
            if not name or not value_text:
                raise ModelfileError(f"line {i + 1}: PARAMETER needs a name and a value")
            value = value_text if name == "stop" else parameter_value(value_text)
            if name == "stop":
                parameters.setdefault("stop", []).append(value)
            else:
                parameters[name] = value
        elif command == "message":
            role, _, raw = rest.strip().partition(" ")
            content, i = _value(raw, lines, i)
            messages.append({"role": role, "content": content})
        else:
            value, i = _value(rest, lines, i)
            if command == "from":
                body["from"] = _from(value, base_dir)
            elif command == "license":
                licenses.append(value)
            elif command == "adapter":
                body.setdefault("adapters", []).append(value)
            else:
                body[command] = value
        i += 1
    if "from" not in body:
        raise ModelfileError("no FROM line: name the model or MLX model directory to build on")
    if parameters:
        body["parameters"] = parameters
    if messages:
        body["messages"] = messages
    if licenses:
        body["license"] = licenses[0] if len(licenses) == 1 else licenses
    return body


def _from(value: str, base_dir: Path | None) -> str:
    """A model name as is; a path (./x, ../x, ~/x, /x) made absolute from the Modelfile's directory."""
    if value.startswith(("./", "../", "~", "/")) or value in (".", ".."):
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        return str(path.resolve())
    return value
