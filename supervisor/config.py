"""Configuration: one precedence everywhere.

CLI flag > environment (CORRAL_*) > config file ($CORRAL_HOME/config.toml) >
default. Each setting is declared once, in SETTINGS (name, metavar, default,
parser, doc, whether PATCH may change it, how GET shows it); the serve flags,
the environment names, the file keys, the Settings defaults and /api/settings
all come from there. `PATCH /api/settings` changes the running server's
Settings object in place; the scheduler reads it at each decision, so a change
applies to the next load.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.runner.protocol import (
    DEFAULT_KV_DISK,
    DEFAULT_NUM_PARALLEL,
    DEFAULT_PROMPT_CACHE,
    parse_size,
    prompt_cache_budget,
)
from corral.supervisor.errors import BadRequest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 11434
DEFAULT_HOST = f"{DEFAULT_ADDRESS}:{DEFAULT_PORT}"
FOREVER = -1.0
MAX_DURATION_S = 100 * 365.25 * 86400
"""Durations beyond ~100 years mean forever: no clock can add them without overflowing."""
MAX_PINNED = 64
MAX_MEMORY_BYTES = 2**60
"""An exabyte: any larger memory figure is a typo, and bigger numbers overflow a float."""

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


def parse_keep_alive(value: Any, name: str = "keep_alive") -> float:
    """keep_alive as Ollama takes it: "5m", "1h30m", "10s", 300, "300", 0, -1.

    Returns seconds; any negative value means forever (FOREVER). `name` is the
    setting or field the value came from, for the error message.
    """
    if isinstance(value, bool) or value is None:
        raise BadRequest(f"invalid {name} {value!r}", param=name)
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an int too large for a float: beyond any limit
            seconds = float("inf") if value > 0 else float("-inf")
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
                f"invalid {name} {value!r}: use a duration such as \"5m\", seconds, 0 or -1",
                param=name,
            )
    else:
        raise BadRequest(f"invalid {name} {value!r}", param=name)
    if seconds != seconds:
        raise BadRequest(f"{name} must be a number", param=name)
    return FOREVER if seconds < 0 or seconds > MAX_DURATION_S else seconds


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_memory_limit(value: Any, total: int) -> int | None:
    """Bytes from 25769803776, "24GB", "24GiB", "512MB" or "80%" (of `total`)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise BadRequest(f"invalid memory limit {value!r}")
    if isinstance(value, (int, float)):
        if not 0 < value <= MAX_MEMORY_BYTES:  # also refuses NaN
            raise BadRequest(f"memory limit must be positive and at most {MAX_MEMORY_BYTES} bytes")
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
    amount = float(m.group(1)) * mult
    if not 0 < amount <= MAX_MEMORY_BYTES:
        raise BadRequest(f"memory limit must be positive and at most {MAX_MEMORY_BYTES} bytes")
    return int(amount)


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
    host, port = text, DEFAULT_PORT
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"host {value!r}: no closing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest.startswith(":"):
            port = _port(value, rest[1:])
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = _port(value, port_text)
    return host or DEFAULT_ADDRESS, port


def _port(value: str, text: str) -> int:
    """The port of host `value`, or a ValueError that names the bad value."""
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ValueError(f"host {value!r}: port {text!r} is not a number from 0 to 65535")
    return int(text)


# ---- the settings table -----------------------------------------------------
#
# Every setting is declared once below; the `corral serve` flags, the CORRAL_*
# environment names, the config.toml keys, the Settings defaults, GET
# /api/settings and the PATCH rules are all read from that declaration (and a
# test checks the README's table against it).

# (setting name, raw value, total physical memory) -> the Settings fields it sets
Parser = Callable[[str, Any, int], dict[str, Any]]


def _address(name: str, raw: Any, total: int) -> dict[str, Any]:
    host, port = parse_host(str(raw))
    return {"host": host, "port": port}


def _path(name: str, raw: Any, total: int) -> dict[str, Any]:
    return {name: Path(str(raw)).expanduser()}


def _duration(name: str, raw: Any, total: int) -> dict[str, Any]:
    return {name: parse_keep_alive(raw, name)}


def _count(minimum: int) -> Parser:
    """An integer setting of at least `minimum`."""

    def parse(name: str, raw: Any, total: int) -> dict[str, Any]:
        try:
            number = int(raw)
        except (TypeError, ValueError):
            raise BadRequest(f"{name} must be an integer, got {raw!r}") from None
        if number < minimum:
            raise BadRequest(f"{name} out of range: {number}")
        return {name: number}

    return parse


def _switch(name: str, raw: Any, total: int) -> dict[str, Any]:
    return {name: parse_bool(raw)}


def _names(name: str, raw: Any, total: int) -> dict[str, Any]:
    return {name: parse_list(raw)}


def _model_names(name: str, raw: Any, total: int) -> dict[str, Any]:
    """A bounded list of valid model names (pinned)."""
    from corral.supervisor.store import normalize_name  # store imports config's neighbours; late

    names = parse_list(raw) if isinstance(raw, (str, list)) or raw is None else None
    if names is None:
        raise BadRequest(f"{name} must be a list of model names or a comma-separated string", param=name)
    if len(names) > MAX_PINNED:
        raise BadRequest(f"{name}: at most {MAX_PINNED} models", param=name)
    for model in names:
        normalize_name(model)
    return {name: names}


def _paths(name: str, raw: Any, total: int) -> dict[str, Any]:
    return {name: [Path(p).expanduser() for p in parse_list(raw)]}


def _show_paths(s: Settings, name: str) -> dict[str, Any]:
    return {name: [str(p) for p in getattr(s, name)]}


def _memory_limit(name: str, raw: Any, total: int) -> dict[str, Any]:
    # The raw form ("80%") is kept too, for display.
    return {name: parse_memory_limit(raw, total), f"{name}_raw": None if raw in (None, "") else str(raw)}


def _bytes(name: str, raw: Any, total: int) -> dict[str, Any]:
    return {name: parse_memory_limit(raw, total) or 0}


def _cache_budget(name: str, raw: Any, total: int) -> dict[str, Any]:
    # Kept as text: a share ("50%") resolves per model (its weights and KV slots).
    text = str(raw).strip()
    try:
        prompt_cache_budget(text, 1)
    except ValueError:
        raise BadRequest(f"{name} must be a size (`1GiB`), a share (`50%`) or `0`, got {raw!r}") from None
    return {name: text}


def _size(name: str, raw: Any, total: int) -> dict[str, Any]:
    try:
        return {name: parse_size(str(raw))}
    except ValueError:
        raise BadRequest(f"{name} must be a size (`4GiB`, `0`), got {raw!r}") from None


def _key_file(name: str, raw: Any, total: int) -> dict[str, Any]:
    """The API key read from a file (its first line), so it shows in no `ps` listing."""
    if raw in (None, ""):
        return {name: None}
    path = Path(str(raw)).expanduser()
    try:
        key = path.read_text().strip().splitlines()[0].strip()
    except (OSError, UnicodeDecodeError, IndexError) as e:
        raise BadRequest(f"{name}: cannot read an API key from {path}: {e or 'empty file'}") from None
    if not key:
        raise BadRequest(f"{name}: {path} holds no API key")
    return {name: path, "api_key": key}


def parse_port_range(raw: Any) -> tuple[int, int] | None:
    """"40000-40999" -> (40000, 40999); empty -> None (any free port)."""
    if raw in (None, ""):
        return None
    low, sep, high = str(raw).strip().partition("-")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise BadRequest(f"runner_ports must look like LOW-HIGH (e.g. 40000-40999), got {raw!r}")
    first, last = int(low), int(high)
    if not 1 <= first <= last <= 65535:
        raise BadRequest(f"runner_ports out of range: {raw!r} (1-65535, LOW <= HIGH)")
    return first, last


def _port_range(name: str, raw: Any, total: int) -> dict[str, Any]:
    return {name: parse_port_range(raw)}


@dataclass(frozen=True)
class HostSpec:
    """One machine a model may run on (the hosts setting); the first one is this machine."""

    ssh: str  # how `mlx.launch` reaches it over ssh (127.0.0.1: no ssh, a local rank)
    ip: str  # the address the ring backend connects to
    memory_limit: int | None = None  # bytes; None: host 0's memory_limit / physical memory


def _host_entry(text: str, total: int) -> HostSpec:
    addr, _, size = text.strip().partition("=")
    addr = addr.strip()
    if not addr or any(c.isspace() for c in addr):
        raise BadRequest(f"hosts: bad entry {text!r}: use ADDRESS or ADDRESS=SIZE (e.g. 10.0.0.2=64GiB)")
    return HostSpec(addr, addr, parse_memory_limit(size.strip(), total) if size.strip() else None)


def read_hostfile(path: Path, total: int) -> list[HostSpec]:
    """A hostfile in `mlx.distributed_config`'s JSON format: a list (or {"hosts": [...]}) of
    {"ssh": NAME, "ips": [IP, ...]}, each optionally with our "memory_limit"."""
    import json

    try:
        data = json.loads(path.read_text())
        entries = data["hosts"] if isinstance(data, dict) else data
        hosts = []
        for h in entries:
            ips = h.get("ips") or [h["ssh"]]
            hosts.append(HostSpec(str(h["ssh"]), str(ips[0]), parse_memory_limit(h.get("memory_limit"), total)))
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise BadRequest(f"hosts: cannot read hostfile {path}: {e}") from None
    return hosts


def parse_hosts(raw: Any, total: int) -> list[HostSpec]:
    """`ADDR[=SIZE],...` (or a TOML list of them), or the path of a JSON hostfile."""
    if raw in (None, "", []):
        return []
    if isinstance(raw, str) and raw.strip().endswith(".json"):
        hosts = read_hostfile(Path(raw.strip()).expanduser(), total)
    else:
        hosts = [_host_entry(entry, total) for entry in parse_list(raw)]
    if len(hosts) == 1:
        raise BadRequest("hosts: list this machine first and at least one more host (or leave it unset)")
    return hosts


def _hosts(name: str, raw: Any, total: int) -> dict[str, Any]:
    return {name: parse_hosts(raw, total)}


def _show_hosts(s: Settings, name: str) -> dict[str, Any]:
    return {name: [{"ssh": h.ssh, "ip": h.ip, "memory_limit": h.memory_limit} for h in s.hosts]}


def _text(name: str, raw: Any, total: int) -> dict[str, Any]:
    return {name: str(raw) if raw not in (None, "") else None}


# Settings -> its part of GET /api/settings
Shower = Callable[["Settings", str], dict[str, Any]]


def _show_value(s: Settings, name: str) -> dict[str, Any]:
    value = getattr(s, name)
    return {name: list(value) if isinstance(value, list) else value}


def _show_text(s: Settings, name: str) -> dict[str, Any]:
    return {name: str(getattr(s, name))}


def _show_path(s: Settings, name: str) -> dict[str, Any]:
    value = getattr(s, name)
    return {name: None if value is None else str(value)}


def _show_address(s: Settings, name: str) -> dict[str, Any]:
    return {name: f"{s.host}:{s.port}"}


def _show_memory_limit(s: Settings, name: str) -> dict[str, Any]:
    return {name: s.memory_limit, f"{name}_raw": s.memory_limit_raw}


def _show_port_range(s: Settings, name: str) -> dict[str, Any]:
    ports = getattr(s, name)
    return {name: f"{ports[0]}-{ports[1]}" if ports else None}


def _show_is_set(s: Settings, name: str) -> dict[str, Any]:
    # A secret: only whether it is set, never the value.
    return {f"{name}_set": getattr(s, name) is not None}


@dataclass(frozen=True)
class Setting:
    """One setting: config.toml key `name`, environment CORRAL_NAME, flag --name."""

    name: str
    metavar: str  # what a value looks like (the flag's metavar)
    default: Any  # as it would be written in config.toml; None: unset (see default_note)
    parse: Parser
    doc: str  # one line (README and --help); markdown `code` allowed
    default_note: str = ""  # how the default reads when unset, or a gloss on it
    mutable: bool = False  # PATCH /api/settings may change it at run time
    flag: bool = True  # `corral serve` has a flag for it
    bare: str | None = None  # what the flag given without a value means
    show: Shower = _show_value

    @property
    def env(self) -> str:
        return f"CORRAL_{self.name.upper()}"

    @property
    def flag_name(self) -> str:
        return "--" + self.name.replace("_", "-")

    def default_text(self, code: Callable[[str], str] = str) -> str:
        """The default in words: `code` marks a literal value (backticks in markdown)."""
        if self.default is None or self.default is False:
            return self.default_note
        text = code(str(self.default))
        return f"{text} ({self.default_note})" if self.default_note else text


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "HOST[:PORT]", DEFAULT_HOST, _address,
            "address to bind (and the CLI's server)", show=_show_address),
    Setting("home", "DIR", "~/.corral", _path,
            "registry, logs, config.toml", show=_show_text),
    Setting("keep_alive", "DURATION", "5m", _duration,
            "idle time before unload; `0` at once, negative forever", mutable=True),
    Setting("max_loaded_models", "N", 0, _count(0),
            "cap on loaded models", default_note="memory decides", mutable=True),
    Setting("single_model", "BOOL", False, _switch,
            "loading a model evicts every other non-pinned one", default_note="off",
            mutable=True, bare="true"),
    Setting("pinned", "MODELS", None, _model_names,
            "comma-separated models loaded at start and never evicted", default_note="none",
            mutable=True),
    Setting("num_parallel", "N", DEFAULT_NUM_PARALLEL, _count(1),
            "sequences decoded together per model"),
    Setting("max_queue", "N", 512, _count(0),
            "waiting requests before 503 + Retry-After"),
    Setting("context_length", "TOKENS", 0, _count(0),
            "num_ctx per sequence (capped at the model's maximum)",
            default_note="by memory: 4096 under 24 GiB, 32768 under 48 GiB, else 262144"),
    Setting("memory_limit", "SIZE", None, _memory_limit,
            "bytes, `24GB` or `80%`", default_note="physical memory", mutable=True,
            show=_show_memory_limit),
    Setting("load_timeout", "DURATION", "5m", _duration,
            "a runner not ready by then fails the request (503)"),
    Setting("stall_timeout", "DURATION", "60s", _duration,
            "a stream silent this long whose runner's /health fails too is killed; `0` never"),
    Setting("drain_timeout", "DURATION", "2m", _duration,
            "a load waiting this long for busy models to finish gets 503 + Retry-After; `0` never"),
    Setting("header_timeout", "DURATION", "30s", _duration,
            "a client connection whose request headers are not all in by then is closed; `0` never"),
    Setting("body_timeout", "DURATION", "60s", _duration,
            "a client connection whose request body sends nothing this long is closed; `0` never"),
    Setting("api_key", "KEY", None, _text,
            "require `Authorization: Bearer` / `x-api-key` on API routes", default_note="none",
            show=_show_is_set),
    Setting("api_key_file", "PATH", None, _key_file,
            "read the API key from this file (not shown by `ps`, unlike `--api-key`)", default_note="none",
            show=_show_path),
    Setting("origins", "ORIGINS", None, _names,
            "extra CORS origins", default_note="local origins"),
    Setting("allowed_hosts", "NAMES", None, _names,
            "extra names accepted in Host (globs, `*` any)", default_note="loopback, localhost, bound address"),
    Setting("models_dirs", "DIRS", None, _paths,
            "comma-separated roots `/api/create` may register directories from",
            default_note="home and the HF cache", show=_show_paths),
    Setting("allow_pull", "PATTERNS", None, _text,
            "`*` or patterns: generate/chat may pull a missing model", default_note="no", bare="*"),
    Setting("default_model", "MODEL", None, _text,
            "model for Anthropic/OpenAI names that are not local (`claude-*`)", default_note="none"),
    Setting("runner_ports", "LOW-HIGH", None, _port_range,
            "ports the runners listen on (loopback), e.g. `40000-40999`", default_note="any free port",
            show=_show_port_range),
    Setting("reserve", "SIZE", "512MiB", _bytes,
            "memory kept free for the OS and the supervisor", flag=False),
    Setting("prompt_cache", "SIZE|SHARE", DEFAULT_PROMPT_CACHE, _cache_budget,
            "prompt (KV) cache per model: bytes, `1GiB`, a share of the model's memory, `0` off"),
    Setting("kv_disk", "SIZE", DEFAULT_KV_DISK, _size,
            "disk for prompt caches kept across unloads (`CORRAL_HOME/kv`, all models), `0` off"),
    Setting("hosts", "HOSTS", None, _hosts,
            "machines a model may span: `ADDR[=SIZE],...`, this one first, or a JSON hostfile "
            "(`mlx.distributed_config` format)", default_note="this machine only", show=_show_hosts),
)
SETTING_NAMES = tuple(s.name for s in SETTINGS)
RUNTIME_MUTABLE = tuple(s.name for s in SETTINGS if s.mutable)
_BY_NAME = {s.name: s for s in SETTINGS}


def _defaults_of(setting: Setting) -> dict[str, Any]:
    """The Settings fields `setting` sets when nothing overrides its default."""
    return setting.parse(setting.name, setting.default, 0)


def _default(field_name: str) -> Callable[[], Any]:
    """A Settings field's default factory: made afresh from the declaration for each
    Settings, so lists are never shared and ~ is expanded when it is built."""
    owner = next(s for s in SETTINGS if field_name in _defaults_of(s))
    return lambda: _defaults_of(owner)[field_name]


@dataclass
class Settings:
    """The running server's configuration. Defaults come from SETTINGS."""

    host: str = field(default_factory=_default("host"))
    port: int = field(default_factory=_default("port"))
    home: Path = field(default_factory=_default("home"))
    keep_alive: float = field(default_factory=_default("keep_alive"))  # seconds; < 0 forever; 0 unload when idle
    max_loaded_models: int = field(default_factory=_default("max_loaded_models"))  # 0: no limit but memory
    single_model: bool = field(default_factory=_default("single_model"))
    pinned: list[str] = field(default_factory=_default("pinned"))
    num_parallel: int = field(default_factory=_default("num_parallel"))
    max_queue: int = field(default_factory=_default("max_queue"))
    context_length: int = field(default_factory=_default("context_length"))
    memory_limit: int | None = field(default_factory=_default("memory_limit"))  # bytes; None: total physical memory
    memory_limit_raw: str | None = field(default_factory=_default("memory_limit_raw"))  # as given ("80%"), for display
    load_timeout: float = field(default_factory=_default("load_timeout"))
    stall_timeout: float = field(default_factory=_default("stall_timeout"))  # seconds; <= 0: never
    drain_timeout: float = field(default_factory=_default("drain_timeout"))  # seconds; <= 0: never
    header_timeout: float = field(default_factory=_default("header_timeout"))  # seconds; <= 0: never
    body_timeout: float = field(default_factory=_default("body_timeout"))  # seconds of body silence; <= 0: never
    api_key: str | None = field(default_factory=_default("api_key"))
    api_key_file: Path | None = field(default_factory=_default("api_key_file"))  # where api_key was read
    origins: list[str] = field(default_factory=_default("origins"))
    allowed_hosts: list[str] = field(default_factory=_default("allowed_hosts"))  # Host names served besides local ones
    models_dirs: list[Path] = field(default_factory=_default("models_dirs"))  # []: home and the HF cache
    allow_pull: str | None = field(default_factory=_default("allow_pull"))  # None: no; "*" or comma-separated fnmatch patterns
    default_model: str | None = field(default_factory=_default("default_model"))  # Anthropic/OpenAI names that are not local map here
    runner_ports: tuple[int, int] | None = field(default_factory=_default("runner_ports"))  # None: any free port
    reserve: int = field(default_factory=_default("reserve"))  # bytes kept free for the OS and the supervisor
    prompt_cache: str = field(default_factory=_default("prompt_cache"))  # size or share, resolved per model
    kv_disk: int = field(default_factory=_default("kv_disk"))  # bytes of disk-tier prompt caches, all models
    hosts: list[HostSpec] = field(default_factory=_default("hosts"))  # []: this machine only; [0] is this one

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def total_memory_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def _read_config_file(home: Path) -> dict[str, Any]:
    path = home / "config.toml"
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"{path}: {e}") from None


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    total_memory: int | None = None,
) -> Settings:
    """Build Settings with the one precedence: flags > env > config file > default.

    `flags` holds only the options given on the command line (None = not given).
    The config file is $CORRAL_HOME/config.toml, CORRAL_HOME itself resolved
    by flag > env > default (the file cannot move itself); its keys are the
    setting names (e.g. keep_alive = "10m").
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = os.environ if env is None else env
    total = total_memory if total_memory is not None else total_memory_bytes()
    home_setting = _BY_NAME["home"]
    home_raw = flags.get("home") or env.get(home_setting.env) or home_setting.default
    values = home_setting.parse("home", home_raw, total)
    file_values = _read_config_file(values["home"])
    for setting in SETTINGS:
        name = setting.name
        raw: Any = None
        if name in flags:
            raw = flags[name]
        elif setting.env in env:
            raw = env[setting.env]
        elif name in file_values:
            raw = file_values[name]
        if raw is None or name == "home":
            continue
        values.update(setting.parse(name, raw, total))
    return Settings(**values)


def settings_to_json(s: Settings) -> dict[str, Any]:
    """What GET /api/settings reports (never the API key itself)."""
    shown: dict[str, Any] = {}
    for setting in SETTINGS:
        shown.update(setting.show(s, setting.name))
    return shown


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
        updates.update(_BY_NAME[name].parse(name, raw, total))
    for k, v in updates.items():
        setattr(s, k, v)
    return sorted(patch)
