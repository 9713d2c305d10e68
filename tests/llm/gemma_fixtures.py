"""Gemma-3 assets for the tests: the packaged Gemma-3-270m spec and tokenizer (real), and a tiny randomly
initialised model of Gemma-3's architecture (sliding + full attention layers, one key/value head, tied and
scaled embeddings, the real 262,144-token vocabulary) so that every method can train a few steps quickly."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest

from chat_fixtures import load_conf

GEMMA = "gemma3_270m"


@functools.cache
def _gemma_spec() -> dict:
    return load_conf("conf/base/parameters.yml")["llm_models"][GEMMA]


@functools.cache
def _gemma_tokenizer():
    from llm_caption.llm.models import load_tokenizer

    return load_tokenizer(_gemma_spec())


@pytest.fixture
def gemma_spec() -> dict:
    return copy.deepcopy(_gemma_spec())


@pytest.fixture
def gemma_tokenizer():
    return _gemma_tokenizer()


def write_tiny_gemma(directory: Path) -> dict:
    """Save a tiny random Gemma-3 model with the real Gemma tokenizer to ``directory``; its model spec."""
    from llm_caption.llm.models import write_tiny_gemma3

    return write_tiny_gemma3(directory, _gemma_tokenizer(), _gemma_spec())


@pytest.fixture(scope="module")
def tiny_gemma_spec(tmp_path_factory) -> dict:
    return write_tiny_gemma(tmp_path_factory.mktemp("tiny_gemma"))
