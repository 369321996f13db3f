"""Ollama library names (`qwen3:0.6b`, `llama3.2:1b`) resolved to Hugging Face repo ids.

corral pulls from the Hugging Face Hub, not from Ollama's registry; this small
curated table (library.toml, shipped with the package) lets the names people
type from habit reach an MLX conversion of the same model. `[library]` in
$CORRAL_HOME/config.toml adds entries or replaces shipped ones.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Any

from corral.supervisor.errors import BadRequest, InvalidModelName
from corral.supervisor.names import normalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SUGGESTED_REPO = "mlx-community/Qwen3-0.6B-4bit"


def _table(text: str, where: str) -> dict[str, str]:
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"{where}: {e}") from None
    table = data.get("library", {})
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise BadRequest(f"{where}: [library] must map names to Hugging Face repo ids (strings)")
    return table


def _keyed(table: dict[str, str], where: str) -> dict[str, str]:
    out = {}
    for name, repo in table.items():
        try:
            out[normalize_name(name)] = repo
        except InvalidModelName as e:
            raise BadRequest(f"{where}: [library] {e.message}") from None
    return out


def shipped_table() -> dict[str, str]:
    """The curated table shipped with the package, keyed by normalized name."""
    text = resources.files("corral.supervisor").joinpath("library.toml").read_text(encoding="utf-8")
    return _keyed(_table(text, "library.toml"), "library.toml")


def load_library(home: Path | None) -> dict[str, str]:
    """The shipped table with $home/config.toml's [library] entries laid over it."""
    table = shipped_table()
    config = Path(home) / "config.toml" if home is not None else None
    if config is not None and config.is_file():
        where = str(config)
        table.update(_keyed(_table(config.read_text(encoding="utf-8"), where), where))
    return table


def looks_like_library_name(key: str) -> bool:
    """A bare Ollama name (no namespace): what a Hub repo id never is."""
    return "/" not in key


def not_on_hub_message(name: str) -> str:
    """Why a bare name cannot be pulled, and what to type instead."""
    return (f"'{name}' is not in corral's table of Ollama library names; corral pulls MLX models "
            f"from the Hugging Face Hub, so give a repo id such as '{SUGGESTED_REPO}' "
            "(see https://huggingface.co/mlx-community), or map the name under [library] "
            "in $CORRAL_HOME/config.toml")
