"""Configuration: one precedence everywhere.

CLI flag > environment (CORRAL_*) > config file ($CORRAL_HOME/config.toml) >
default. `GET/PATCH /api/settings` changes the running server's Settings
object in place; the scheduler reads it at each decision, so a change applies
to the next load.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from corral.supervisor.errors import BadRequest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_HOST = "127.0.0.1:11434"
DEFAULT_KEEP_ALIVE = 300.0
FOREVER = -1.0


@dataclass
class Settings:
    """The running server's configuration. Field names = env names less CORRAL_, lowercased."""

    host: str = "127.0.0.1"
    port: int = 11434
    home: Path = field(default_factory=lambda: Path.home() / ".corral")
    keep_alive: float = DEFAULT_KEEP_ALIVE  # seconds; < 0 forever; 0 unload when idle
    max_loaded_models: int = 0  # 0: no limit but memory
    single_model: bool = False
    pinned: list[str] = field(default_factory=list)
    num_parallel: int = 4
    max_queue: int = 512
    context_length: int = 0  # num_ctx when a request names none; 0: default_context_length(memory)
    memory_limit: int | None = None  # bytes; None: total physical memory
    memory_limit_raw: str | None = None  # as given ("80%", "24GB"), for display
    load_timeout: float = 300.0
    api_key: str | None = None
    origins: list[str] = field(default_factory=list)
    allow_pull: str | None = None  # None/"": no; "*" or comma-separated fnmatch patterns
    default_model: str | None = None  # Anthropic/OpenAI names that are not local map here
    reserve: int = 512 * 1024 * 1024  # bytes kept free for the OS and the supervisor

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


# Settings that PATCH /api/settings may change at run time.
RUNTIME_MUTABLE = ("single_model", "pinned", "keep_alive", "max_loaded_models", "memory_limit")

_DURATION_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_COMPOUND_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_COMPOUND_FULL_RE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|h|m|s))+")


GIB = 1 << 30


def default_context_length(memory_bytes: int) -> int:
    """The context length when none is configured, by Ollama's tiers of the memory the
    models may use: under 24 GiB 4k, under 48 GiB 32k, else 256k (each load caps it at
    the model's maximum)."""
    if memory_bytes < 24 * GIB:
        return 4096
    if memory_bytes < 48 * GIB:
        return 32768
    return 262144


def parse_keep_alive(value: Any) -> float:
    """keep_alive as Ollama takes it: "5m", "1h30m", "10s", 300, "300", 0, -1.

    Returns seconds; any negative value means forever (FOREVER).
    """
    if isinstance(value, bool) or value is None:
        raise BadRequest(f"invalid keep_alive {value!r}", param="keep_alive")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        elif value and _COMPOUND_FULL_RE.fullmatch(value.strip().lstrip("-")):
            parts = _COMPOUND_RE.findall(value.strip().lstrip("-"))
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
            if value.strip().startswith("-"):
                seconds = -seconds
        else:
            raise BadRequest(
                f"invalid keep_alive {value!r}: use a duration such as \"5m\", seconds, 0 or -1",
                param="keep_alive",
            )
    else:
        raise BadRequest(f"invalid keep_alive {value!r}", param="keep_alive")
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise BadRequest("keep_alive must be finite", param="keep_alive")
    return FOREVER if seconds < 0 else seconds


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_memory_limit(value: Any, total: int) -> int | None:
    """Bytes from 25769803776, "24GB", "24GiB", "512MB" or "80%" (of `total`)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise BadRequest(f"invalid memory limit {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise BadRequest("memory limit must be positive")
        return int(value)
    text = str(value).strip()
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise BadRequest(f"invalid memory limit {value!r}") from None
        if not 0 < pct <= 100:
            raise BadRequest("a memory limit percentage must be in (0, 100]")
        return int(total * pct / 100)
    m = _SIZE_RE.match(text)
    if not m:
        raise BadRequest(f"invalid memory limit {value!r}: use bytes, \"24GB\" or \"80%\"")
    unit = (m.group(2) or "").lower()
    base = 1024 if "i" in unit else 1000
    mult = {"": 1, "b": 1}.get(unit) or base ** "bkmgt".index(unit[0])
    result = int(float(m.group(1)) * mult)
    if result <= 0:
        raise BadRequest("memory limit must be positive")
    return result


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise BadRequest(f"invalid boolean {value!r}")


def parse_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def parse_host(value: str) -> tuple[str, int]:
    """"127.0.0.1:11434", "0.0.0.0", ":8080", "http://localhost:1234", "[::1]:11434"."""
    text = value.strip()
    for prefix in ("http://", "https://"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    text = text.rstrip("/")
    host, port = text, 11434
    if text.startswith("["):
        end = text.index("]")
        host, rest = text[1:end], text[end + 1 :]
        if rest.startswith(":"):
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = int(port_text)
    return host or "127.0.0.1", port


def _convert(name: str, value: Any, total_memory: int) -> dict[str, Any]:
    """One raw setting (from flag, env or file) into Settings field values."""
    if name == "host":
        host, port = parse_host(str(value))
        return {"host": host, "port": port}
    if name == "home":
        return {"home": Path(str(value)).expanduser()}
    if name == "keep_alive":
        return {"keep_alive": parse_keep_alive(value)}
    if name in ("max_loaded_models", "num_parallel", "max_queue", "context_length"):
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise BadRequest(f"{name} must be an integer, got {value!r}") from None
        if number < 0 or (name == "num_parallel" and number < 1):
            raise BadRequest(f"{name} out of range: {number}")
        return {name: number}
    if name == "single_model":
        return {"single_model": parse_bool(value)}
    if name in ("pinned", "origins"):
        return {name: parse_list(value)}
    if name == "memory_limit":
        return {"memory_limit": parse_memory_limit(value, total_memory), "memory_limit_raw": None if value in (None, "") else str(value)}
    if name == "load_timeout":
        return {"load_timeout": parse_keep_alive(value) if isinstance(value, str) else float(value)}
    if name in ("api_key", "allow_pull", "default_model"):
        return {name: (str(value) if value not in (None, "") else None)}
    if name == "reserve":
        return {"reserve": parse_memory_limit(value, total_memory) or 0}
    raise BadRequest(f"unknown setting {name!r}")


SETTING_NAMES = (
    "host", "home", "keep_alive", "max_loaded_models", "single_model", "pinned",
    "num_parallel", "max_queue", "context_length", "memory_limit", "load_timeout",
    "api_key", "origins", "allow_pull", "default_model", "reserve",
)


def total_memory_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    total_memory: int | None = None,
) -> Settings:
    """Build Settings with the one precedence: flags > env > config file > default.

    `flags` holds only the options given on the command line (None = not given).
    The config file is $CORRAL_HOME/config.toml, CORRAL_HOME itself resolved
    by the same precedence; its keys are the setting names (e.g. keep_alive = "10m").
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = os.environ if env is None else env
    total = total_memory if total_memory is not None else total_memory_bytes()

    home_raw = flags.get("home") or env.get("CORRAL_HOME") or str(Path.home() / ".corral")
    home = Path(home_raw).expanduser()
    file_values: dict[str, Any] = {}
    config_path = home / "config.toml"
    if config_path.is_file():
        try:
            file_values = tomllib.loads(config_path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"{config_path}: {e}") from None

    values: dict[str, Any] = {"home": home}
    for name in SETTING_NAMES:
        raw: Any = None
        if name in flags:
            raw = flags[name]
        elif f"CORRAL_{name.upper()}" in env:
            raw = env[f"CORRAL_{name.upper()}"]
        elif name in file_values:
            raw = file_values[name]
        if raw is None or name == "home":
            continue
        values.update(_convert(name, raw, total))
    known = {f.name for f in fields(Settings)}
    return Settings(**{k: v for k, v in values.items() if k in known})


def settings_to_json(s: Settings) -> dict[str, Any]:
    """What GET /api/settings reports (never the API key itself)."""
    return {
        "host": f"{s.host}:{s.port}",
        "home": str(s.home),
        "keep_alive": s.keep_alive,
        "max_loaded_models": s.max_loaded_models,
        "single_model": s.single_model,
        "pinned": list(s.pinned),
        "num_parallel": s.num_parallel,
        "max_queue": s.max_queue,
        "context_length": s.context_length,
        "memory_limit": s.memory_limit,
        "memory_limit_raw": s.memory_limit_raw,
        "load_timeout": s.load_timeout,
        "api_key_set": s.api_key is not None,
        "origins": list(s.origins),
        "allow_pull": s.allow_pull,
        "default_model": s.default_model,
    }


def apply_patch(s: Settings, patch: Mapping[str, Any], total_memory: int | None = None) -> list[str]:
    """Apply PATCH /api/settings to the running Settings. Returns the changed names.

    Validates everything before changing anything, so a bad patch changes nothing.
    """
    if not isinstance(patch, Mapping):
        raise BadRequest("settings patch must be a JSON object")
    unknown = [k for k in patch if k not in RUNTIME_MUTABLE]
    if unknown:
        raise BadRequest(
            f"cannot change {', '.join(sorted(unknown))} at run time; "
            f"changeable: {', '.join(RUNTIME_MUTABLE)}"
        )
    total = total_memory if total_memory is not None else total_memory_bytes()
    updates: dict[str, Any] = {}
    for name, raw in patch.items():
        if name == "memory_limit" and raw is None:
            updates.update({"memory_limit": None, "memory_limit_raw": None})
        else:
            updates.update(_convert(name, raw, total))
    for k, v in updates.items():
        setattr(s, k, v)
    return sorted(patch)
