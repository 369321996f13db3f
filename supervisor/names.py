"""Model names as Ollama writes them: `[host/][namespace/]name[:tag]`, case-insensitive.

A Hugging Face repo id ("org/repo") is such a name with the tag "latest";
registered names (`corral create`, `corral cp`) may carry any tag. A name is
validated here before anything compares it with what is on disk, so no
request can make a name reach outside the store.
"""

from __future__ import annotations

import re

from corral.supervisor.errors import InvalidModelName

MAX_NAME_LEN = 256
DEFAULT_TAG = "latest"
# Ollama's own registry host and namespace: `registry.ollama.ai/library/qwen3` is `qwen3`.
OLLAMA_HOST = "registry.ollama.ai"
OLLAMA_NAMESPACE = "library"
# One to three path-like segments of the characters Hub repo ids use.
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
# Ollama's tag rule; a host segment may carry a port.
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_HOST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(:[0-9]{1,5})?$")


def split_name(name: object) -> tuple[str, str]:
    """Validate a requested model name and split it into (base, tag), case kept.

    Ollama's naming rules: `[host/][namespace/]model[:tag]`, the tag defaulting
    to "latest". Ollama's own default host and namespace
    (`registry.ollama.ai/library/`) are dropped, so `library/qwen3` is `qwen3`.
    Raises InvalidModelName (400) for non-strings, empty names, names over 256
    chars, "..", absolute paths, backslashes, NUL or control characters, and
    malformed segments or tags.
    """
    if not isinstance(name, str):
        raise InvalidModelName("model name must be a string")
    if not name.strip():
        raise InvalidModelName("model name is required")
    if len(name) > MAX_NAME_LEN:
        raise InvalidModelName(f"model name is longer than {MAX_NAME_LEN} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidModelName("model name contains control characters")
    if "\\" in name:
        raise InvalidModelName("model name must not contain a backslash")
    if name.startswith("/"):
        raise InvalidModelName("model name must not be an absolute path")
    head, slash, last = name.rpartition("/")
    model, sep, tag = last.partition(":")
    if sep and not _TAG.match(tag):
        raise InvalidModelName(f"invalid model name {name!r}: a tag is letters, digits, '_', '.', '-' "
                               "(at most 128, not starting with '.' or '-')")
    segments = [*head.split("/"), model] if slash else [model]
    if any(s in ("", ".", "..") for s in segments):
        raise InvalidModelName(f"invalid model name {name!r}: empty, '.' or '..' path segment")
    host_ok = len(segments) < 3 or _HOST.match(segments[0]) is not None
    if len(segments) > 3 or not host_ok or not all(_SEGMENT.match(s) for s in segments[-2:]):
        raise InvalidModelName(
            f"invalid model name {name!r}: use [host/][namespace/]name[:tag] with letters, digits, "
            "'.', '_', '-'"
        )
    if len(segments) == 3 and segments[0].lower() == OLLAMA_HOST:
        segments = segments[1:]
    if len(segments) == 2 and segments[0].lower() == OLLAMA_NAMESPACE:
        segments = segments[1:]
    return "/".join(segments), (tag if sep else DEFAULT_TAG)


def display_name(name: object) -> str:
    """A valid name as shown: case kept, ":latest" left off (`tagged` adds it for Ollama)."""
    base, tag = split_name(name)
    return base if tag.lower() == DEFAULT_TAG else f"{base}:{tag}"


def normalize_name(name: object) -> str:
    """The lookup key of a requested name: `display_name` lower-cased (names are case-insensitive),
    so "Org/Repo", "org/repo:latest" and "ORG/REPO:LATEST" are one model and "m:v2" another.
    Raises InvalidModelName as split_name does.
    """
    return display_name(name).lower()


def tagged_name(name: str) -> str:
    """A display name with its tag, as Ollama shows every name ("org/repo:latest")."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:{DEFAULT_TAG}"
