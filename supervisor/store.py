"""Where models live (STUB: interface fixed, body to implement).

Two sources: the Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub, else
~/.cache/huggingface/hub) and a registry under CORRAL_HOME (name -> directory,
written by `corral create` and `corral cp`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from supervisor.manifest import Manifest


@dataclass(frozen=True)
class ModelRef:
    name: str  # display name: the repo id as found ("corral-test/tiny") or the registered name
    path: Path  # directory holding config.json (an HF snapshot dir or a registered dir)
    source: Literal["hf", "local"]
    digest: str  # HF snapshot commit hash, or a stable hash of the registered path
    modified_at: float  # unix time
    size: int  # bytes on disk of the model's files


def normalize_name(name: object) -> str:
    """Validate and canonicalize a requested model name.

    Strips a ":latest" tag; lower-cases for lookup. Raises InvalidModelName (400)
    for non-strings, empty names, names over 256 chars, "..", absolute paths,
    backslashes, NUL or control characters, and tags other than ":latest".
    """
    raise NotImplementedError


class ModelStore:
    def __init__(self, home: Path, hf_cache: Path | None = None) -> None:
        raise NotImplementedError

    def list(self) -> list[ModelRef]:
        """Every model present locally (HF cache + registry), sorted by name."""
        raise NotImplementedError

    def resolve(self, name: str) -> ModelRef:
        """The model for a requested name; InvalidModelName (400) or ModelNotFound (404)."""
        raise NotImplementedError

    def manifest(self, ref: ModelRef) -> Manifest:
        """Cached by file identity (path, size, mtime) so listing a large cache stays fast."""
        raise NotImplementedError

    def register(self, name: str, path: Path) -> ModelRef:
        """`corral create NAME --from DIR`: checks the directory is a loadable model."""
        raise NotImplementedError

    def copy(self, src: str, dst: str) -> ModelRef:
        """`corral cp` / POST /api/copy: registers dst as another name for src's directory."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Registered names are unregistered; HF cache entries are removed from the cache."""
        raise NotImplementedError
