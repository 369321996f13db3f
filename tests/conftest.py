"""Shared fixtures: tiny generated models (session-scoped, made once per run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.models import make_hf_model, make_model

TINY = "corral-test/tiny"
TINY_B = "corral-test/tiny-b"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain float32 model directory: hidden 64, 2 layers, vocab 512."""
    return make_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_q4_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same shape, 4-bit quantized (config has a quantization block)."""
    return make_model(tmp_path_factory.mktemp("models") / "tiny-q4", "--quantize", "--hidden", "128")


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hub cache dir holding two models: corral-test/tiny and corral-test/tiny-b."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    make_hf_model(cache, TINY)
    make_hf_model(cache, TINY_B, "--seed", "1", "--hidden", "96")
    return cache
